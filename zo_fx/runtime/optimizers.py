"""MeZO, FZOO and AdaMeZO over a compiled ZOModule.

Each step is one call of ``ZOModule.group_losses`` (G perturbed copies in one batched
pass), a few scalars of arithmetic, and one fused update pass per parameter that
regenerates every direction from its seed. No weight is ever perturbed in place, so
a skipped step (non-finite loss, zero loss spread) leaves the weights bit-identical.

Direction seeds are a pure function of (optimizer seed, step, index), so a run resumed
from ``state_dict()`` draws the same directions as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .module import GroupTable, ZOModule
from .trajectory import ParamSpec, Trajectory

NO_DECAY_KEYS = ("bias", "norm", "ln_")


def direction_seed(seed: int, step: int, index: int) -> int:
    """Seed of direction ``index`` at ``step``: 63 bits of BLAKE2b(seed, step, index)."""
    digest = hashlib.blake2b(f"zo_fx:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to weight matrices, not to biases and norms (as the MeZO reference)."""
    return param.dim() >= 2 and not any(k in name.lower() for k in NO_DECAY_KEYS)


@dataclass
class StepInfo:
    step: int
    losses: list[float]
    seeds: list[int]
    coefs: list[float]
    lr: float
    forward_passes: int
    sigma: float | None = None
    skipped: bool = False
    reason: str | None = None
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The loss of the unperturbed model where the method evaluates it, else the mean of the groups."""
        return self.losses[0] if self.sigma is not None else sum(self.losses) / len(self.losses)

    def as_dict(self) -> dict:
        return asdict(self)


class ZOOptimizer:
    """Shared machinery: learning rate and schedule, seeds, skipping, trajectory, state."""

    method = "zo"

    def __init__(self, zm: ZOModule, lr: float, eps: float, *, weight_decay: float = 0.0, kind: str = "rademacher",
                 seed: int = 0, lr_schedule: Callable[[int], float] | None = None):
        if lr < 0 or eps <= 0:
            raise ValueError(f"need lr >= 0 and eps > 0; got lr={lr}, eps={eps}")
        self.zm = zm
        self.lr = float(lr)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.kind = kind
        self.seed = int(seed)
        self.lr_schedule = lr_schedule
        self.step_count = 0
        self.forward_passes = 0
        self.skipped_steps = 0
        self.params = zm.trainable_parameters()
        # a torch optimizer over one dummy tensor: lets torch LR schedulers and the HF Trainer drive our lr
        self.torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=self.lr)
        self.trajectory = Trajectory(
            method=self.method, kind=kind, weight_decay=self.weight_decay,
            params=[ParamSpec(n, zm.pids[n], decays(n, p)) for n, p in self.params.items()],
        )

    # ---- learning rate ----------------------------------------------------------------------------------
    def current_lr(self) -> float:
        if self.lr_schedule is None:
            return float(self.torch_optimizer.param_groups[0]["lr"])
        if isinstance(self.lr_schedule, torch.optim.lr_scheduler.LRScheduler):
            return float(self.lr_schedule.get_last_lr()[0])
        return float(self.lr_schedule(self.step_count))

    # ---- the step -----------------------------------------------------------------------------------------
    def table(self) -> GroupTable:
        raise NotImplementedError

    def estimate(self, means: list[float]) -> tuple[list[int], list[float], float | None, str | None]:
        """(seeds, coefs, sigma, skip reason) of this step's update from the group mean losses."""
        raise NotImplementedError

    def _record(self, seeds, coefs, lr) -> dict:
        return {"step": self.step_count, "seeds": seeds, "coefs": coefs, "lr": lr, "mode": "linear"}

    @torch.no_grad()
    def step(self, batch: dict) -> StepInfo:
        t0 = time.perf_counter()
        table = self.table()
        losses = self.zm.group_losses(batch, table)
        t1 = time.perf_counter()
        self.forward_passes += table.groups
        means = [float(v) for v in losses.double().mean(1).tolist()]
        lr = self.current_lr()
        seeds, coefs, sigma, reason = [], [], None, None
        if not all(math.isfinite(v) for v in means):
            bad = [i for i, v in enumerate(means) if not math.isfinite(v)]
            reason = f"non-finite loss in group(s) {bad}: step skipped, weights untouched"
        else:
            seeds, coefs, sigma, reason = self.estimate(means)
        info = StepInfo(self.step_count, means, seeds, coefs, lr, self.forward_passes, sigma)
        if reason is not None:
            info.skipped, info.reason = True, reason
            self.skipped_steps += 1
        else:
            self.trajectory.records.append(self._record(seeds, coefs, lr))
            self.trajectory.apply(self.params, len(self.trajectory.records) - 1)
        t2 = time.perf_counter()
        info.timing = {"forward_s": t1 - t0, "update_s": t2 - t1}
        info.seconds = t2 - t0
        self.step_count += 1
        if isinstance(self.lr_schedule, torch.optim.lr_scheduler.LRScheduler):
            self.torch_optimizer.step()  # a no-op (its one tensor has no gradient), in the order schedulers expect
            self.lr_schedule.step()
        return info

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "method": self.method, "step_count": self.step_count, "forward_passes": self.forward_passes,
            "skipped_steps": self.skipped_steps, "seed": self.seed, "lr": self.lr, "eps": self.eps,
            "kind": self.kind, "weight_decay": self.weight_decay,
            "torch_optimizer": self.torch_optimizer.state_dict(),
            "trajectory": self.trajectory.to_dict(),
        }
        if isinstance(self.lr_schedule, torch.optim.lr_scheduler.LRScheduler):
            state["lr_schedule"] = self.lr_schedule.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method:
            raise ValueError(f"state was saved by {state.get('method')!r}, not {self.method!r}")
        for key in ("seed", "eps", "kind", "weight_decay"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]!r} but this optimizer has {getattr(self, key)!r}; "
                                 "build the optimizer with the same settings to resume")
        self.step_count = state["step_count"]
        self.forward_passes = state["forward_passes"]
        self.skipped_steps = state["skipped_steps"]
        self.torch_optimizer.load_state_dict(state["torch_optimizer"])
        self.trajectory = Trajectory.from_dict(state["trajectory"])
        if "lr_schedule" in state and isinstance(self.lr_schedule, torch.optim.lr_scheduler.LRScheduler):
            self.lr_schedule.load_state_dict(state["lr_schedule"])


class MeZO(ZOOptimizer):
    """MeZO (Malladi et al., 2023): one direction, two-sided, ``p = (l+ - l-) / (2 eps)``."""

    method = "mezo"

    def __init__(self, zm: ZOModule, lr: float, eps: float = 1e-3, weight_decay: float = 0.0,
                 kind: str = "gaussian", seed: int = 0, lr_schedule=None):
        super().__init__(zm, lr, eps, weight_decay=weight_decay, kind=kind, seed=seed, lr_schedule=lr_schedule)

    def table(self) -> GroupTable:
        s = direction_seed(self.seed, self.step_count, 0)
        return GroupTable([s, s], [1.0, -1.0], self.eps, self.kind)

    def estimate(self, means):
        s = direction_seed(self.seed, self.step_count, 0)
        return [s], [(means[0] - means[1]) / (2 * self.eps)], None, None


class FZOO(ZOOptimizer):
    """FZOO (Dang et al.): N one-sided Rademacher directions, step normalised by the loss spread.

    As the reference code: ``sigma = std(l_1..l_N)`` (population), ``coef_i =
    (l_i - l_0) / (N * sigma)``, ``theta -= lr * sum_i coef_i * u_i``. A zero spread
    (all losses equal) skips the step.
    """

    method = "fzoo"

    def __init__(self, zm: ZOModule, lr: float, eps: float = 1e-3, n_directions: int = 8, weight_decay: float = 0.0,
                 kind: str = "rademacher", seed: int = 0, lr_schedule=None):
        if n_directions < 2:
            raise ValueError(f"FZOO needs at least 2 directions to estimate the loss spread; got {n_directions}")
        self.n_directions = int(n_directions)
        super().__init__(zm, lr, eps, weight_decay=weight_decay, kind=kind, seed=seed, lr_schedule=lr_schedule)

    def _seeds(self) -> list[int]:
        return [direction_seed(self.seed, self.step_count, i) for i in range(self.n_directions)]

    def table(self) -> GroupTable:
        return GroupTable([0] + self._seeds(), [0.0] + [1.0] * self.n_directions, self.eps, self.kind)

    def estimate(self, means):
        l0, rest = means[0], means[1:]
        mean = sum(rest) / len(rest)
        sigma = math.sqrt(sum((v - mean) ** 2 for v in rest) / len(rest))
        if sigma == 0.0:
            return [], [], sigma, "all perturbed losses are equal (sigma = 0): step skipped, weights untouched"
        n = self.n_directions
        return self._seeds(), [(v - l0) / (n * sigma) for v in rest], sigma, None


class AdaMeZO(MeZO):
    """AdaMeZO: MeZO estimates with truncated Adam moments over the last ``horizon`` directions.

    The moments are never stored: each update regenerates the last K directions chunk
    by chunk from their seeds (random access into the Philox streams) and forms
    ``m = sum b1^j p_j z_j``, ``v = sum b2^j p_j^2 z_j^2``, ``step = scale * m / (sqrt(v) + 1e-5)``.
    ``scale`` defaults to the reference code's constant 100, so its learning rates carry over.
    The first ``horizon`` steps are plain MeZO steps (the reference's warm-up).
    """

    method = "adamezo"

    def __init__(self, zm: ZOModule, lr: float, eps: float = 1e-3, horizon: int = 10,
                 betas: tuple[float, float] = (0.7, 0.9), weight_decay: float = 0.0, kind: str = "gaussian",
                 seed: int = 0, lr_schedule=None, scale: float = 100.0, adam_eps: float = 1e-5):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1; got {horizon}")
        super().__init__(zm, lr, eps, weight_decay=weight_decay, kind=kind, seed=seed, lr_schedule=lr_schedule)
        self.trajectory.horizon = int(horizon)
        self.trajectory.betas = tuple(float(b) for b in betas)
        self.trajectory.ada_scale = float(scale)
        self.trajectory.adam_eps = float(adam_eps)

    @property
    def horizon(self) -> int:
        return self.trajectory.horizon

    def _record(self, seeds, coefs, lr) -> dict:
        rec = super()._record(seeds, coefs, lr)
        accepted = len(self.trajectory.records) + 1
        rec["mode"] = "linear" if accepted <= self.horizon else "adamezo"
        return rec
