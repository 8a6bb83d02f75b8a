"""The run folder: where a job writes, what it may replace, and how it checkpoints and resumes.

A job must never lose an earlier run by mistake and must continue an interrupted one exactly.
:func:`prepare_output_dir` decides the folder and what ``--overwrite`` would replace (deleting
nothing yet); :func:`write_checkpoint` and :func:`restore_checkpoint` wrap
:mod:`zo_fx.optim.checkpoint` with the job's data position and its check that a resumed run
repeats the settings that change what it computes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from zo_fx.files import free_bytes, human_bytes
from zo_fx.finetune.adam import AdamBaseline
from zo_fx.finetune.config import FinetuneConfig, FinetuneError
from zo_fx.optim.checkpoint import checkpoint_folders, latest_checkpoint, load_checkpoint, save_checkpoint

FINAL_CHECKPOINTS_KEPT = 2
# Settings that change what a run computes; a resumed run must repeat them exactly.
RESUME_KEYS = ("model", "task", "label_words", "template", "data_dir", "method", "peft", "lr", "eps",
               "directions", "horizon", "batch_size", "max_length", "seed", "n_train", "n_val", "n_test",
               "dtype", "weight_decay", "lr_schedule", "reward", "max_new_tokens", "do_sample", "temperature", "top_k",
               "top_p", "demonstrations", "direction_kind", "rank", "peft_fields",
               "lazy_steps")
_RUN_FILES = ("metrics.json", "trajectory.json", "model.safetensors", "curves.png", "LATEST", "model", "adapter")


def output_dir_of(cfg: FinetuneConfig) -> Path:
    """``--output-dir``, or a new timestamped folder under runs/finetune."""
    if cfg.output_dir is None:
        path = Path(cfg.task)
        stem = (path.stem or path.resolve().name) if path.exists() or cfg.task.endswith(".jsonl") else cfg.task.lower()
        return Path("runs") / "finetune" / f"{stem}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output_dir)


def prepare_output_dir(cfg: FinetuneConfig, out: Path) -> list[Path]:
    """The files of an earlier run in ``out`` that ``overwrite`` will replace.

    Nothing is deleted here: the job removes them only once the new run has been set up without
    error, so a mistake in the new run's flags cannot cost the old one.
    """
    if cfg.output_dir is None:
        return []
    if cfg.resume:
        if latest_checkpoint(out) is None:
            raise FinetuneError(f"--resume: {out} holds no intact checkpoint (no complete step-* folder that "
                                "matches its manifest); run without --resume to start afresh")
        return []
    leftovers = sorted(p for p in out.glob("step-*.tmp") if p.is_dir())
    if leftovers:  # a run killed while writing its first checkpoint: nothing of it can be resumed
        print(f"[zo_fx] removing {len(leftovers)} unfinished checkpoint folder(s) of an interrupted run in {out}")
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
    stale = [out / f for f in _RUN_FILES if (out / f).exists()] + checkpoint_folders(out)
    stale += sorted(out.glob("adam-state-*"))
    if stale and not cfg.overwrite:
        names = ", ".join(p.name for p in stale[:4])
        raise FinetuneError(f"--output-dir {out} already holds a run ({names}); pass --resume to continue "
                            "it, --overwrite to replace it, or choose another --output-dir")
    return stale


def restore_checkpoint(out: Path, cfg: FinetuneConfig, model, optimizer, cursor, data_sha256: str) -> dict:
    """Load the newest intact checkpoint in ``out`` into model, optimizer and data cursor; return the run's state.

    Refused: other settings than the run's, or other task data (its examples' hash).
    """
    folder = latest_checkpoint(out, log=print)
    if folder is None:
        raise FinetuneError(f"--resume: {out} holds no intact checkpoint; run without --resume to start afresh")
    extra = json.loads((folder / "extra.json").read_text())
    if extra.get("data_sha256", data_sha256) != data_sha256:
        raise FinetuneError(f"--resume: the task data changed since the run in {out} started (its examples hash "
                            "differently): a resumed run would train on other data than it did. Restore the "
                            "original task file or start a new --output-dir")
    older = {"lr_schedule": "constant", "reward": None, "max_new_tokens": 32, "do_sample": False,
             "temperature": None, "top_k": None, "top_p": None, "demonstrations": 0, "direction_kind": None,
             "rank": None, "peft_fields": None, "lazy_steps": None}  # settings runs written before them had
    saved, now = {**older, **extra.get("settings", {})}, cfg.resolved()
    decays = cfg.lr_schedule != "constant"
    keys = RESUME_KEYS + (("steps",) if decays else ())  # a decay spans the planned steps
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}"
               for k in keys if saved.get(k) != now[k]]
    if changed:
        raise FinetuneError(f"--resume: the run in {out} used other settings ({'; '.join(changed)}); resume "
                            "with the saved settings (see its checkpoint's extra.json) or start a new "
                            "--output-dir")
    try:
        extra = load_checkpoint(folder, model, optimizer, verified=True)  # latest_checkpoint hashed it
        cursor.load_state_dict(extra["cursor"])
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise FinetuneError(f"--resume: cannot continue the run in {out}: {err}") from None
    return extra


#: what a checkpoint holds besides the weights (optimizer state, trajectory, extras): a generous margin
CHECKPOINT_OVERHEAD = 16 << 20


def check_free_space(out: Path, trainable_bytes: int) -> None:
    """Refuse a run whose folder cannot hold even one checkpoint (the trainable weights and their state)."""
    needed = trainable_bytes + CHECKPOINT_OVERHEAD
    free = free_bytes(out)
    if free is not None and free < needed:
        raise FinetuneError(f"--output-dir {out} has {human_bytes(free)} free, less than one checkpoint needs "
                            f"(about {human_bytes(needed)}: the trainable weights and the optimizer state); free "
                            "space or choose another --output-dir")


def write_checkpoint(out: Path, model, optimizer, cursor, state: dict) -> None:
    """Checkpoint weights, optimizer, data position and ``state``; drop Adam moments no checkpoint names."""
    save_checkpoint(out, model, optimizer, extra={**state, "cursor": cursor.state_dict()},
                    keep=FINAL_CHECKPOINTS_KEPT)
    if isinstance(optimizer, AdamBaseline):
        optimizer.prune({int(p.name[len("step-"):]) for p in checkpoint_folders(out)})
