"""One fine-tuning run end to end: set up, evaluate zero-shot (or resume), train, evaluate, write outputs.

:class:`FinetuneJob` sequences the other modules of :mod:`zo_fx.finetune`; :func:`run` is
what ``zo-fx finetune`` calls. All setup that can fail on bad input happens in the
constructor, before anything is written or an earlier run is replaced.

Under ``torchrun`` (``torchrun --nproc_per_node=K -m zo_fx finetune ...``) every rank runs the
same job on the same batches, and the optimizer splits each step's direction groups over the
ranks (``strategy="directions"``, :mod:`zo_fx.optim.distributed`); only rank 0 takes the run
lock, prints, and writes checkpoints and outputs, the others stay silent.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from zo_fx.files import atomic_path, atomic_write_json, replace_dir
from zo_fx.finetune.config import DEFAULT_EVALS, DTYPES, FinetuneConfig, FinetuneError
from zo_fx.finetune.evaluation import evaluate
from zo_fx.finetune.loss import build_loss, check_label_words
from zo_fx.finetune.model import apply_peft, load_model_and_tokenizer, load_tokenizer
from zo_fx.finetune.optimizer import build_optimizer
from zo_fx.finetune.plots import plot_curves, summary_table
from zo_fx.finetune.resume import output_dir_of, prepare_output_dir, restore_checkpoint, write_checkpoint
from zo_fx.finetune.task import build_task
from zo_fx.locks import RunLock, RunLockedError
from zo_fx.optim.distributed import init_from_env, is_main_process


class _NoLock(contextlib.nullcontext):
    """What a rank other than 0 holds instead of the run lock (rank 0 holds the real one)."""

    def release(self) -> None:
        pass


class FinetuneJob:
    """One run of :func:`run`, in three parts: ``start`` (zero-shot or resume), ``train``, ``finish``.

    The constructor does all the setup that can fail on bad input (task, model, tokenizer, label
    words, compile) before anything is written or an earlier run is replaced.
    """

    def __init__(self, cfg: FinetuneConfig):
        self.wall0 = time.perf_counter()
        self.cfg = cfg
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.out = output_dir_of(cfg)
        self.main = is_main_process()  # rank 0 (or the only process): the one that writes
        try:  # before anything is read from or written to the folder
            self.lock = RunLock.acquire(self.out) if self.main else _NoLock()
        except RunLockedError as err:
            raise FinetuneError(str(err)) from None
        try:
            self._setup(cfg)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg: FinetuneConfig) -> None:
        stale = prepare_output_dir(cfg, self.out) if self.main else []
        self.task = build_task(cfg)
        print(self.task.summary(), flush=True)
        early = load_tokenizer(cfg.model)
        if early is not None:  # label words by token id, before the model load
            check_label_words(self.task, early)
        print(f"loading {cfg.model} ...", flush=True)
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, DTYPES[cfg.dtype])
        self.model = apply_peft(model, cfg.peft, cfg.seed)
        self.loss = build_loss(self.task, self.tokenizer, self.model, cfg.peft)
        self.cursor = self.task.cursor(cfg.batch_size, seed=cfg.seed)
        example = self.encode(self.task.train[:cfg.batch_size])
        self.optimizer = build_optimizer(cfg, self.model, self.loss, example, self.out)
        for path in stale:  # --overwrite, now that the new run is set up
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.total = cfg.total_steps
        self.eval_every = cfg.eval_every or max(1, math.ceil(self.total / DEFAULT_EVALS))
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        trainable = sum(p.numel() for p in self.optimizer.params.values())
        parameters = sum(p.numel() for p in self.model.parameters())
        print(f"{cfg.method} on {trainable:,} of {parameters:,} parameters (peft={cfg.peft}), "
              f"lr={cfg.learning_rate:g}, {self.total} steps x {cfg.per_step_forward_passes} "
              f"forward passes of {cfg.batch_size} examples -> {self.out}", flush=True)

    def encode(self, examples) -> dict:
        return self.task.encode(self.tokenizer, examples, self.cfg.max_length)

    def evaluation(self, split: str, phase: str) -> dict:
        opt = self.optimizer
        if phase == "train":
            desc = f"{split} at step {opt.step_count}"
        else:
            desc = f"{phase.replace('_', '-')} {split}"
        result = evaluate(self.model, self.task, self.tokenizer, self.loss, split, self.cfg.max_length,
                          desc=desc)
        return {"step": opt.step_count, "forward_passes": opt.forward_passes, "phase": phase, **result}

    def start(self) -> dict:
        """The run's state: restored from the newest checkpoint, or fresh with zero-shot evaluations."""
        if self.cfg.resume:
            state = restore_checkpoint(self.out, self.cfg, self.model, self.optimizer, self.cursor,
                                       self.task.fingerprint())
            print(f"resumed at step {self.optimizer.step_count} from {self.out}", flush=True)
        else:
            zero_shot = [self.evaluation(split, "zero_shot") for split in ("validation", "test")]
            state = {"history": [], "evals": zero_shot}
        state["settings"] = self.cfg.resolved()
        state["data_sha256"] = self.task.fingerprint()
        return state

    def train(self, state: dict) -> None:
        """Step until ``total``; validate and checkpoint on schedule; report skipped steps as they happen."""
        opt, history = self.optimizer, state["history"]
        if opt.step_count < self.total:
            self.compile_phase()
        bar = tqdm(total=self.total, initial=min(opt.step_count, self.total), desc=self.cfg.method,
                   unit="step", dynamic_ncols=True)
        smooth = history[-1]["loss"] if history else math.nan
        while opt.step_count < self.total:
            info = opt.step(self.encode(self.cursor.next_batch()))
            done = opt.step_count
            record = {"step": done, "loss": info.loss, "sigma": info.sigma, "lr": info.lr,
                      "forward_passes": info.forward_passes, "seconds": info.seconds, "skipped": info.skipped}
            if info.skipped:
                record["reason"] = info.reason
                bar.write(f"step {done}: {info.reason}")
            history.append(record)
            if math.isfinite(info.loss):
                smooth = info.loss if not math.isfinite(smooth) else 0.9 * smooth + 0.1 * info.loss
            sigma = "" if info.sigma is None else f" sigma={info.sigma:.2e}"
            bar.set_postfix_str(f"loss={smooth:.4f}{sigma} fwd={info.forward_passes:,} "
                                f"ex/s={self.cfg.batch_size / max(info.seconds, 1e-9):.1f}")
            bar.update(1)
            if done % self.eval_every == 0 or done == self.total:
                ev = self.evaluation("validation", "train")
                state["evals"].append(ev)
                bar.write(f"step {done} ({ev['forward_passes']:,} forward passes): validation accuracy "
                          f"{ev['accuracy']:.4f}, loss {ev['loss']:.4f}")
            if self.main and (done % self.checkpoint_every == 0 or done == self.total):
                write_checkpoint(self.out, self.model, opt, self.cursor, state)
        bar.close()

    def compile_phase(self) -> None:
        """Build the grouped graph and the generator kernels before the first step, as their own phase.

        The first evaluation of a group table rewrites the graph and compiles the direction
        generators (tens of seconds, minutes on a busy CPU); inside the step bar that time would
        make step 1 look like the rate and the ETA hours long. One evaluation of the step's group
        table on a training batch does it here; it changes nothing (a pure function of the weights).
        """
        zm, table = getattr(self.optimizer, "zm", None), getattr(self.optimizer, "table", None)
        if zm is None or table is None:
            return
        with tqdm(total=1, desc="compile", unit="graph", dynamic_ncols=True) as bar:
            zm.group_losses(self.encode(self.task.train[:self.cfg.batch_size]), table())
            bar.update(1)

    def finish(self, state: dict) -> dict:
        """Final evaluations; metrics.json, trajectory.json, model.safetensors, curves.png; the summary."""
        opt, evals = self.optimizer, state["evals"]
        if not any(e["split"] == "validation" and e["step"] == opt.step_count and e["phase"] != "zero_shot"
                   for e in evals):
            evals.append(self.evaluation("validation", "final"))
        evals.append(self.evaluation("test", "final"))
        metrics = self.metrics(state)
        if not self.main:
            return metrics
        with atomic_path(self.out / "model.safetensors") as tmp:
            save_file({n: p.detach().contiguous() for n, p in opt.params.items()}, str(tmp))
        if opt.trajectory is not None:
            opt.trajectory.save(self.out / "trajectory.json")
        plot_curves(metrics, self.out / "curves.png")
        atomic_write_json(self.out / "metrics.json", metrics, indent=1)
        print(summary_table(metrics, self.out), flush=True)
        try:  # last: a model transformers cannot save must not cost the run's other outputs
            folder = export_pretrained(self.model, self.tokenizer, self.out)
            print(f"saved {folder} (load it with {'PeftModel' if folder.name == 'adapter' else 'AutoModel*'}"
                  ".from_pretrained)", flush=True)
        except Exception as err:  # noqa: BLE001 - reported, the weights are in model.safetensors
            print(f"[zo_fx] could not write a from_pretrained folder ({type(err).__name__}: {err}); the trained "
                  "weights are in model.safetensors and trajectory.json", flush=True)
        return metrics

    def metrics(self, state: dict) -> dict:
        """What ``metrics.json`` holds: settings, task, model, step history, evaluations, final numbers."""
        opt, evals, history, task = self.optimizer, state["evals"], state["history"], self.task

        def last(split: str, zero_shot: bool) -> dict:
            picked = [e for e in evals if e["split"] == split and (e["phase"] == "zero_shot") == zero_shot]
            return {k: picked[-1][k] for k in ("accuracy", "loss", "n")} if picked else {}

        return {
            "settings": state["settings"],
            "task": {"name": task.name, "description": task.description, "label_words": task.label_words,
                     "template": task.template,
                     "sizes": {s: len(getattr(task, s)) for s in ("train", "validation", "test")}},
            "model": {"name": self.cfg.model, "class": type(self.model).__name__,
                      "parameters": sum(p.numel() for p in self.model.parameters()),
                      "trainable": sum(p.numel() for p in opt.params.values())},
            "history": history,
            "evals": evals,
            "final": {
                "zero_shot": {s: last(s, True) for s in ("validation", "test")},
                "fine_tuned": {s: last(s, False) for s in ("validation", "test")},
                "steps": opt.step_count,
                "forward_passes": opt.forward_passes,
                "skipped_steps": sum(1 for h in history if h["skipped"]),
                "train_seconds": sum(h["seconds"] for h in history),
                "wall_seconds": time.perf_counter() - self.wall0,
            },
        }


def export_pretrained(model, tokenizer, out: Path) -> Path:
    """The trained model as Hugging Face loads it: ``out/adapter`` (a PEFT adapter, for
    ``PeftModel.from_pretrained(base, ...)``) or ``out/model`` (``save_pretrained`` weights, config
    and tokenizer, for ``AutoModelForCausalLM.from_pretrained``). Written beside, then renamed."""
    is_peft = hasattr(model, "peft_config")
    final = out / ("adapter" if is_peft else "model")
    tmp = out / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    replace_dir(tmp, final)
    return final


def run(cfg: FinetuneConfig) -> dict:
    """Run the job of ``cfg`` end to end and return what ``metrics.json`` holds.

    Launched by ``torchrun``, the process joins the group first; ranks other than 0 run silent.
    """
    init_from_env()
    with contextlib.ExitStack() as quiet:
        if not is_main_process():  # prints and progress bars; an error still surfaces once the context exits
            sink = quiet.enter_context(open(os.devnull, "w"))  # noqa: SIM115 - closed by the exit stack
            quiet.enter_context(contextlib.redirect_stdout(sink))
            quiet.enter_context(contextlib.redirect_stderr(sink))
        job = FinetuneJob(cfg)
        with job.lock:
            state = job.start()
            job.train(state)
            return job.finish(state)
