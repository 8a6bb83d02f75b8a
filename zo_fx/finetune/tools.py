"""``zo-fx eval`` and ``zo-fx replay``: use what a run produced without writing Python.

* :func:`evaluate_model`: accuracy and loss of a model folder (``save_pretrained``, or a
  PEFT ``adapter/`` folder on its base model) on a task's validation and test splits,
  scored exactly as the job scores them.
* :func:`replay_run`: a run folder's trajectory applied to the base model it started from
  (model, adapter and seed read from its ``metrics.json``), written as a model or adapter
  folder, and checked bit for bit against the run's own final weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from zo_fx.finetune.config import DTYPES, FinetuneConfig, FinetuneError
from zo_fx.finetune.evaluation import evaluate
from zo_fx.finetune.job import export_pretrained
from zo_fx.finetune.loss import build_loss, fit_task
from zo_fx.finetune.model import apply_peft, load_model_and_tokenizer
from zo_fx.finetune.peft_methods import method_of_peft_type
from zo_fx.finetune.task import build_task
from zo_fx.locks import RunLock, RunLockedError
from zo_fx.optim.trajectory import Trajectory, TrajectoryError, replay


def _load_for_eval(folder: str, base_model: str, dtype: torch.dtype):
    path = Path(folder)
    if not (path / "adapter_config.json").is_file():
        model, tokenizer = load_model_and_tokenizer(folder, dtype)
        return model, tokenizer, "none"
    from peft import PeftModel

    base, tokenizer = load_model_and_tokenizer(base_model, dtype)
    model = PeftModel.from_pretrained(base, path).eval()
    config = model.peft_config["default"]
    kind = method_of_peft_type(config.peft_type.value, bool(getattr(config, "use_dora", False)))
    return model, tokenizer, kind


def evaluate_model(cfg: FinetuneConfig, base_model: str = "smollm2") -> dict:
    """Validation and test accuracy and loss of the model folder ``cfg.model`` on ``cfg``'s task."""
    task = build_task(cfg)
    model, tokenizer, kind = _load_for_eval(cfg.model, base_model, DTYPES[cfg.dtype])
    task = fit_task(task, tokenizer, model)
    loss = build_loss(task, tokenizer, model, kind)
    return {"model": cfg.model, "task": task.name,
            "results": [evaluate(model, task, tokenizer, loss, s, cfg.max_length) for s in ("validation", "test")]}


def replay_run(run_dir, output_dir) -> dict:
    """Replay ``run_dir``'s trajectory onto its base model; write the result to ``output_dir``."""
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    try:
        settings = json.loads((run_dir / "metrics.json").read_text())["settings"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as err:
        raise FinetuneError(f"{run_dir} is not a finished zo-fx run (metrics.json: {err})") from None
    if settings["method"] == "adam":
        raise FinetuneError(f"{run_dir} is an Adam run: it has no trajectory to replay")
    try:
        trajectory = Trajectory.load(run_dir / "trajectory.json")
    except (FileNotFoundError, TrajectoryError) as err:
        raise FinetuneError(str(err)) from None
    try:
        lock = RunLock.acquire(output_dir)
    except RunLockedError as err:
        raise FinetuneError(str(err)) from None
    with lock:
        model, tokenizer = load_model_and_tokenizer(settings["model"], DTYPES[settings["dtype"]])
        model = apply_peft(model, settings["peft"], settings["seed"], settings.get("peft_fields"),
                           settings.get("steps"))
        try:
            replay(model, trajectory)
        except TrajectoryError as err:
            raise FinetuneError(str(err)) from None
        folder = export_pretrained(model, tokenizer, output_dir)
    identical = None
    if (run_dir / "model.safetensors").is_file():
        params = dict(model.named_parameters())
        trained = load_file(str(run_dir / "model.safetensors"))
        identical = all(torch.equal(params[n], t) for n, t in trained.items())
    return {"run": str(run_dir), "records": len(trajectory), "output": str(folder),
            "identical_to_the_run": identical}
