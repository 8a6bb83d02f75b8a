"""Crash-safe, verified checkpoints: trained weights + optimizer state (with trajectory) + caller's extras.

A checkpoint is a folder ``step-<n>/`` holding ``weights.safetensors`` (the trainable
parameters only: frozen ones come from the base model), ``optimizer.json``,
``extra.json`` (e.g. the data position) and ``manifest.json`` (size and sha256 of each
of the others). It is written under a temporary name, every file fsynced, and renamed
into place; ``LATEST`` is replaced atomically afterwards, so a crash at any moment leaves
the previous checkpoint usable. Loading verifies the manifest first: a damaged newest
checkpoint (flipped bytes, an edited coefficient) is never loaded; the newest intact one
is, with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zo_fx.files import atomic_write_text, replace_dir, writing

LATEST = "LATEST"
MANIFEST = "manifest.json"


class CheckpointDamagedError(ValueError):
    """A checkpoint's files do not match its manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damage(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` cannot be trusted, or None when every file matches its manifest."""
    manifest = folder / MANIFEST
    if not manifest.exists():  # written before checkpoints had manifests: complete by construction (renamed)
        missing = [n for n in ("weights.safetensors", "optimizer.json", "extra.json") if not (folder / n).exists()]
        return f"files missing: {missing}" if missing else None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "its manifest is unreadable"
    for name, want in files.items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def checkpoint_folders(output_dir) -> list[Path]:
    """Complete step folders (no ``.tmp`` leftovers of an interrupted write), newest first."""
    found = [p for p in Path(output_dir).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def save_checkpoint(output_dir, model: torch.nn.Module, optimizer, extra: dict | None = None,
                    keep: int = 2) -> Path:
    """Write ``output_dir/step-<n>`` and point ``output_dir/LATEST`` at it; keep the newest ``keep``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{optimizer.step_count:08d}"
    final = output_dir / name
    tmp = output_dir / (name + ".tmp")
    tensors = {n: p.detach().contiguous() for n, p in optimizer.params.items()}
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        with writing(f"checkpoint {name}", output_dir, needed=needed):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file(tensors, str(tmp / "weights.safetensors"))
            buffers = optimizer.state_tensors() if hasattr(optimizer, "state_tensors") else {}
            if buffers:  # a stateful method's momentum buffers
                save_file({k: v.contiguous() for k, v in buffers.items()}, str(tmp / "state.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(optimizer.state_dict()))
            (tmp / "extra.json").write_text(json.dumps(extra or {}))
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            replace_dir(tmp, final)
            atomic_write_text(output_dir / LATEST, name)
    except BaseException:  # the half-written folder goes; the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in checkpoint_folders(output_dir)[keep:] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(output_dir, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest intact checkpoint: the one ``LATEST`` names, or, if it is damaged or missing, the newest
    step folder that verifies (``log`` says which was passed over and why). None when none is intact."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    named = output_dir / pointer.read_text().strip() if pointer.exists() else None
    candidates = ([named] if named is not None else []) + [p for p in checkpoint_folders(output_dir) if p != named]
    passed_over = []
    for folder in candidates:
        reason = damage(folder) if folder.is_dir() else "it does not exist"
        if reason is None:
            if passed_over and log is not None:
                log(f"[zo_fx] checkpoint {'; '.join(passed_over)}: resuming from {folder.name}, the newest intact one")
            return folder
        passed_over.append(f"{folder.name} skipped ({reason})")
    return None


def load_checkpoint(path, model: torch.nn.Module, optimizer, log: Callable[[str], None] | None = print, *,
                    verified: bool = False) -> dict:
    """Restore weights and optimizer state from ``path`` (a step folder or an output dir); returns extras.

    The checkpoint is verified against its manifest before anything is loaded; from an output
    dir the newest intact checkpoint is taken (see :func:`latest_checkpoint`). ``verified``: the
    caller has just had ``path`` from :func:`latest_checkpoint`, which read and checked every file.
    """
    path = Path(path)
    if not (path / "optimizer.json").exists() and ((path / LATEST).exists() or checkpoint_folders(path)):
        found = latest_checkpoint(path, log)
        if found is None:
            raise FileNotFoundError(f"{path} holds no intact checkpoint (every step folder is damaged or incomplete)")
        path = found
    if not (path / "weights.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected weights.safetensors and optimizer.json)")
    reason = None if verified else damage(path)
    if reason is not None:
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: {reason}; it was not loaded")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(path / "weights.safetensors")).items():
            if name not in params:
                raise KeyError(f"checkpoint has weight {name!r} that the model does not; is it the same model?")
            params[name].copy_(value)
    optimizer.load_state_dict(json.loads((path / "optimizer.json").read_text()))
    if hasattr(optimizer, "load_state_tensors"):
        buffers = path / "state.safetensors"
        optimizer.load_state_tensors(load_file(str(buffers)) if buffers.is_file() else {})
    return json.loads((path / "extra.json").read_text())
