"""AdamW with backprop behind the zeroth-order optimizers' interface: the baseline ZO runs are compared to.

The job, its checkpoints and the convergence benchmark drive every method the same way
(``step(batch)``, ``params``, ``step_count``, ``state_dict``); this adapter lets
``torch.optim.AdamW`` take part, including exact resume of its moments.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zo_fx.files import atomic_path
from zo_fx.finetune.config import FinetuneError
from zo_fx.optim.base import StepInfo
from zo_fx.passes.capture import model_output_tensor

MOMENTS_PREFIX, MOMENTS_SUFFIX = "adam-state-", ".safetensors"


class AdamBaseline:
    """Backprop + ``torch.optim.AdamW`` behind the ZO optimizers' interface (a comparison baseline).

    ``step(batch)`` returns a :class:`zo_fx.StepInfo`; ``params``, ``step_count`` and
    ``state_dict`` are what ``save_checkpoint`` reads. AdamW's moments are tensors, which do not
    belong in ``optimizer.json``; they go to ``adam-state-<step>.safetensors`` in the output
    folder, written atomically *before* the checkpoint that names them.
    """

    method = "adam"

    def __init__(self, model, loss, lr: float, weight_decay: float, state_dir: Path, lr_at=None):
        self.model, self.loss, self.lr, self.state_dir = model, loss, lr, Path(state_dir)
        self.lr_at = lr_at  # step -> lr; None keeps lr constant
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.torch_optimizer = torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=weight_decay)
        self.step_count = self.forward_passes = self.skipped_steps = 0
        self.trajectory = None

    def step(self, batch: dict) -> StepInfo:
        t0 = time.perf_counter()
        lr = self.lr if self.lr_at is None else self.lr_at(self.step_count)
        for group in self.torch_optimizer.param_groups:
            group["lr"] = lr
        outputs = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = model_output_tensor(outputs)
        loss = self.loss(logits, batch).mean()
        self.forward_passes += 1
        info = StepInfo(self.step_count, [float(loss.detach())], [], [], lr, self.forward_passes)
        if math.isfinite(info.losses[0]):
            loss.backward()
            self.torch_optimizer.step()
        else:
            info.skipped, info.reason, info.nonfinite = True, "non-finite loss: step skipped, weights untouched", True
            self.skipped_steps += 1
        self.torch_optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        info.seconds = time.perf_counter() - t0
        return info

    def state_dict(self) -> dict:
        state = self.torch_optimizer.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}
        name = f"{MOMENTS_PREFIX}{self.step_count:08d}{MOMENTS_SUFFIX}"
        with atomic_path(self.state_dir / name) as tmp:
            save_file(tensors, str(tmp))
        return {"method": self.method, "step_count": self.step_count, "forward_passes": self.forward_passes,
                "skipped_steps": self.skipped_steps, "param_groups": state["param_groups"], "moments": name}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method:
            raise FinetuneError(f"the checkpoint was written by {state.get('method')!r}, not adam")
        flat = load_file(str(self.state_dir / state["moments"]))
        per_param: dict[int, dict] = {}
        for key, value in flat.items():
            i, k = key.split(".", 1)
            per_param.setdefault(int(i), {})[k] = value
        self.torch_optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
        self.step_count, self.forward_passes = state["step_count"], state["forward_passes"]
        self.skipped_steps = state["skipped_steps"]

    def prune(self, keep_steps: set[int]) -> None:
        """Delete moment files no kept checkpoint names (and temporaries a crash left behind)."""
        for path in self.state_dir.glob(f"{MOMENTS_PREFIX}*{MOMENTS_SUFFIX}"):
            step = path.name[len(MOMENTS_PREFIX):-len(MOMENTS_SUFFIX)]
            if not step.isdigit() or int(step) not in keep_steps:
                path.unlink(missing_ok=True)
