"""Crash-safe checkpoints: trained weights + optimizer state (with trajectory) + caller's extras.

A checkpoint is a folder ``step-<n>/`` holding ``weights.safetensors`` (the trainable
parameters only: frozen ones come from the base model), ``optimizer.json`` and
``extra.json`` (e.g. the data position). It is written under a temporary name and
renamed into place, and ``LATEST`` is replaced atomically afterwards, so a crash at any
moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zo_fx.files import atomic_write_text, replace_dir

LATEST = "LATEST"


def save_checkpoint(output_dir, model: torch.nn.Module, optimizer, extra: dict | None = None,
                    keep: int = 2) -> Path:
    """Write ``output_dir/step-<n>`` and point ``output_dir/LATEST`` at it; keep the newest ``keep``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{optimizer.step_count:08d}"
    final = output_dir / name
    tmp = output_dir / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {n: p.detach().contiguous() for n, p in optimizer.params.items()}
    save_file(tensors, str(tmp / "weights.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(optimizer.state_dict()))
    (tmp / "extra.json").write_text(json.dumps(extra or {}))
    shutil.rmtree(final, ignore_errors=True)
    replace_dir(tmp, final)
    atomic_write_text(output_dir / LATEST, name)
    old = sorted(p for p in output_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for stale in old[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(output_dir) -> Path | None:
    pointer = Path(output_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    return path if (path / "optimizer.json").exists() else None


def load_checkpoint(path, model: torch.nn.Module, optimizer) -> dict:
    """Restore weights and optimizer state from ``path`` (a step folder or an output dir); returns extras."""
    path = Path(path)
    if (path / LATEST).exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path / LATEST} points at a checkpoint that is missing or incomplete")
        path = found
    if not (path / "weights.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected weights.safetensors and optimizer.json)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(path / "weights.safetensors")).items():
            if name not in params:
                raise KeyError(f"checkpoint has weight {name!r} that the model does not; is it the same model?")
            params[name].copy_(value)
    optimizer.load_state_dict(json.loads((path / "optimizer.json").read_text()))
    return json.loads((path / "extra.json").read_text())
