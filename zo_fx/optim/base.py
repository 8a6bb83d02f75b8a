"""The machinery every zeroth-order method shares: one step = one grouped pass + one fused update.

Each step is one call of ``ZOModule.group_losses`` (G perturbed copies in one batched
pass), a few scalars of arithmetic (the method's :meth:`ZOOptimizer.estimate`), and one
fused update pass per parameter that regenerates every direction from its seed. No
weight is ever perturbed in place, so a skipped step (non-finite loss or learning rate,
zero loss spread) leaves the weights bit-identical.

Direction seeds are a pure function of (run seed, step, index), so a run resumed from
``state_dict()`` draws the same directions as an uninterrupted one, and so processes that
share the run seed draw the same directions: under ``torch.distributed`` the ranks split
the step's evaluations (``strategy``), exchange only the group losses, and apply the same
update (see :mod:`zo_fx.optim.distributed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from zo_fx.compile import ZOModule
from zo_fx.streams.layout import B_SEED_MASK
from zo_fx.streams.table import GroupTable

from .config import ZOConfig
from .distributed import Distributed
from .guard import apply_checked, check_settings_fit
from .means import example_means
from .trajectory import Trajectory, model_fingerprint, tensor_specs

NO_DECAY_KEYS = ("bias", "norm", "ln_")


def direction_seed(seed: int, step: int, index: int) -> int:
    """Seed of direction ``index`` at ``step``: 63 bits of BLAKE2b(seed, step, index)."""
    digest = hashlib.blake2b(f"zo_fx:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def lazy_seed(seed: int, step: int, index: int, lazy_steps: int) -> int:
    """Seed of direction ``index`` at ``step`` under lazy low-rank directions (LOZO).

    The high 31 bits (what factor B is drawn from, see ``zo_fx.streams.layout.b_factor_seed``) are a
    hash of (seed, step // lazy_steps, index): B stays for ``lazy_steps`` steps. The low 32 bits
    follow the step: A is fresh every step.
    """
    window = hashlib.blake2b(f"zo_fx:lazy-b:{seed}:{step // lazy_steps}:{index}".encode(), digest_size=8).digest()
    high = int.from_bytes(window, "little") & (2**63 - 1) & B_SEED_MASK
    return high | (direction_seed(seed, step, index) & 0xFFFFFFFF)


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
    #: examples (batch indices) left out of this step's estimate: their loss was non-finite in some group
    dropped_examples: list[int] = field(default_factory=list)
    #: the step was skipped because a loss or an updated weight was not finite
    nonfinite: bool = False
    #: what an objective reported (a reward step: mean reward per group, completion lengths, failures)
    objective: dict = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The loss of the unperturbed model where the method evaluates it, else the mean of the groups."""
        return self.losses[0] if self.sigma is not None else sum(self.losses) / len(self.losses)

    def as_dict(self) -> dict:
        return asdict(self)


class ZOOptimizer:
    """Learning rate and schedule, seeds, skipping, trajectory and state, over a method's config.

    Subclasses set ``method`` and ``Config`` and implement :meth:`table` (the groups a step
    evaluates) and :meth:`estimate` (the update's seeds and coefficients from their losses).
    Build one with keyword settings (``FZOO(zm, lr=1e-3, n_directions=8)``) or with a
    ready config (``FZOO(zm, config=FZOOConfig(lr=1e-3))``).

    Distributed runs (see :mod:`zo_fx.optim.distributed`): ``process_group`` (default: the
    default group when ``torch.distributed`` is initialised, else none: one process),
    ``strategy`` (``"directions"``: each rank evaluates a share of the groups on the whole
    batch; ``"data"``: each rank evaluates all groups on its shard of the batch), ``timeout`` (a
    ``timedelta`` or seconds after which a step's collective raises; default the group's own,
    which is also what lets the process exit) and ``shard_batch`` (``"data"`` only: False when
    each rank is already given its own examples). These are how the run is executed, not what it
    computes, so they are not part of the config or the saved state: a run may resume with
    another world size.
    """

    method: ClassVar[str] = "zo"
    Config: ClassVar[type[ZOConfig]] = ZOConfig
    #: whether updates read and advance per-parameter buffers (zo_fx.optim.stateful)
    stateful: ClassVar[bool] = False

    def __init__(self, zm: ZOModule, lr: float | None = None, *, config: ZOConfig | None = None,
                 lr_schedule: Callable[[int], float] | None = None, process_group=None,
                 strategy: str = "directions", timeout=None, shard_batch: bool = True, **settings):
        if config is None:
            config = self.Config.from_settings(type(self).__name__, lr=lr, **settings)
        elif lr is not None or settings:
            raise TypeError(f"{type(self).__name__}: pass either config= or keyword settings, not both")
        if type(config) is not self.Config:
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}; got {type(config).__name__}")
        self.config = config
        self.zm = zm
        self.distributed = Distributed.resolve(process_group, strategy, timeout, shard_batch)
        self.strategy = strategy
        self.lr_schedule = lr_schedule
        self.step_count = 0
        self.forward_passes = 0
        self.skipped_steps = 0
        self.params = zm.trainable_parameters()
        _refuse_fsdp(zm.model, self.params)
        check_settings_fit(config, self.params)
        # a torch optimizer over one dummy tensor: lets torch LR schedulers and the HF Trainer drive our lr
        self.torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
        self.trajectory = self._new_trajectory()
        #: per-parameter buffers of a stateful method (momentum, ZO-Adam): {} before the first update;
        #: None for the others, and for a stateful one whose saved buffers have not been loaded yet
        self.state: dict | None = {} if self.stateful else None

    # ---- settings (read from the config, the one place they live) -----------------------------------------
    lr = property(lambda self: self.config.lr, doc="the base learning rate (a schedule may change the current one)")
    eps = property(lambda self: self.config.eps)
    kind = property(lambda self: self.config.kind)
    seed = property(lambda self: self.config.seed)
    weight_decay = property(lambda self: self.config.weight_decay)

    def _new_trajectory(self) -> Trajectory:
        specs = tensor_specs(self.zm.model, [(n, self.zm.pids[n], decays(n, p)) for n, p in self.params.items()])
        return Trajectory(method=self.method, kind=self.kind, weight_decay=self.weight_decay, params=specs,
                          model=model_fingerprint(self.zm.model))

    # ---- learning rate ----------------------------------------------------------------------------------
    def current_lr(self) -> float:
        if self.lr_schedule is None:
            return float(self.torch_optimizer.param_groups[0]["lr"])
        if isinstance(self.lr_schedule, torch.optim.lr_scheduler.LRScheduler):
            return float(self.lr_schedule.get_last_lr()[0])
        return float(self.lr_schedule(self.step_count))

    # ---- the step -----------------------------------------------------------------------------------------
    def step_seeds(self, count: int) -> list[int]:
        """The seeds of this step's ``count`` directions (a pure function of run seed, step and index;
        under lazy low-rank directions, of the step's window of ``lazy_steps`` steps too)."""
        if self.config.lazy_steps > 1:
            return [lazy_seed(self.seed, self.step_count, i, self.config.lazy_steps) for i in range(count)]
        return [direction_seed(self.seed, self.step_count, i) for i in range(count)]

    def table(self) -> GroupTable:
        raise NotImplementedError

    def estimate(self, means: list[float]) -> tuple[list[int], list[float], float | None, str | None]:
        """(seeds, coefs, sigma, skip reason) of this step's update from the group mean losses."""
        raise NotImplementedError

    def _record(self, seeds, coefs, lr) -> dict:
        return {"step": self.step_count, "seeds": seeds, "coefs": coefs, "lr": lr, "mode": "linear"}

    @staticmethod
    def _lr_problem(lr: float) -> str | None:
        if not math.isfinite(lr) or lr < 0:
            return f"the learning rate of this step is {lr} (from the schedule): step skipped, weights untouched"
        return None

    @torch.no_grad()
    def step(self, batch: dict, objective=None) -> StepInfo:
        """One step on ``batch``: the group table's per-example losses, the method's estimate, the update.

        ``objective(zm, batch, table, step) -> [G, B]`` replaces the model's per-example loss, e.g. a
        :class:`~zo_fx.optim.reward.RewardObjective` (loss = -reward of each group's generated text).
        """
        if self.stateful and self.state is None:
            raise RuntimeError(f"this {self.method} optimizer was restored with load_state_dict but its buffers were "
                               "not: call load_state_tensors (load_checkpoint does both) before stepping")
        t0 = time.perf_counter()
        table = self.table()
        with self.direction_scaling():
            means, dropped = self._group_means(batch, table, objective)
        t1 = time.perf_counter()
        self.forward_passes += table.groups
        lr = self.current_lr()
        seeds, coefs, sigma, reason, nonfinite = [], [], None, None, False
        if not all(math.isfinite(v) for v in means):
            bad = [i for i, v in enumerate(means) if not math.isfinite(v)]
            reason = (f"non-finite loss in group(s) {bad}, in some group for every example of the batch: "
                      "step skipped, weights untouched")
            nonfinite = True
        else:
            seeds, coefs, sigma, reason = self.estimate(means)
            reason = reason or self._lr_problem(lr)
        if reason is None:
            self.trajectory.records.append(self._record(seeds, coefs, lr))
            refused = apply_checked(self.trajectory, self.params, len(self.trajectory.records) - 1, self.zm.impl,
                                    self.state)
            if refused is not None:
                self.trajectory.records.pop()
                reason, nonfinite = f"{refused}: step skipped, weights untouched", True
        info = StepInfo(self.step_count, means, seeds, coefs, lr, self.forward_passes, sigma,
                        dropped_examples=dropped, nonfinite=nonfinite)
        if reason is not None:
            info.skipped, info.reason = True, reason
            self.skipped_steps += 1
        t2 = time.perf_counter()
        info.timing = {"forward_s": t1 - t0, "update_s": t2 - t1}
        if objective is not None and getattr(objective, "last", None):
            extra = {k: v for k, v in objective.last.items() if k != "completions"}
            info.timing.update(extra.pop("timing", {}))
            info.objective = extra
        info.seconds = t2 - t0
        self.step_count += 1
        if isinstance(self.lr_schedule, torch.optim.lr_scheduler.LRScheduler):
            self.torch_optimizer.step()  # a no-op (its one tensor has no gradient), in the order schedulers expect
            self.lr_schedule.step()
        return info

    def _group_means(self, batch: dict, table: GroupTable, objective) -> tuple[list[float], int]:
        """The groups' mean losses over the batch (and how many examples were dropped as non-finite)."""
        if objective is not None:
            if self.distributed is not None:
                raise NotImplementedError("an objective (rewards) is not split over ranks yet; run it on one "
                                          "process, or use the per-example loss under torch.distributed")
            return example_means(objective(self.zm, batch, table, self.step_count).double())
        if self.distributed is None:
            return example_means(self.zm.group_losses(batch, table).double())
        return self.distributed.group_means(self.zm, batch, table, self.step_count)  # the same on every rank

    def direction_scaling(self):
        """The context the step's forward runs in: a method whose directions are scaled element by element
        (HiZOO) returns :func:`zo_fx.kernels.scaling.scaled_directions` here."""
        return contextlib.nullcontext()

    # ---- state ----------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The buffers of a stateful method as flat ``"<param>::<buffer>"`` tensors (a checkpoint's
        ``state.safetensors``); empty for methods whose state is the trajectory alone."""
        return {f"{name}::{key}": t for name, buffers in (self.state or {}).items() for key, t in buffers.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` gave (call after :meth:`load_state_dict`)."""
        if not self.stateful:
            if tensors:
                raise ValueError(f"{self.method} keeps no buffers, but the checkpoint holds {len(tensors)}")
            return
        unknown = sorted({k.split("::", 1)[0] for k in tensors} - set(self.params))
        if unknown:
            raise ValueError(f"the checkpoint's buffers name parameters this model does not train: {unknown[:3]}")
        if self.trajectory.records and not tensors:
            raise ValueError(f"the checkpoint has {len(self.trajectory.records)} {self.method} updates but no "
                             "buffers (state.safetensors): the run cannot continue exactly")
        self.state = {}
        for key, t in tensors.items():
            name, buffer = key.split("::", 1)
            self.state.setdefault(name, {})[buffer] = t.clone()

    def state_dict(self) -> dict:
        state = {
            "method": self.method, "config": self.config.to_dict(), "step_count": self.step_count,
            "forward_passes": self.forward_passes, "skipped_steps": self.skipped_steps,
            "torch_optimizer": self.torch_optimizer.state_dict(), "trajectory": self.trajectory.to_dict(),
        }
        if isinstance(self.lr_schedule, torch.optim.lr_scheduler.LRScheduler):
            state["lr_schedule"] = self.lr_schedule.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved run; refuses a state whose method or any setting differs from this optimizer's."""
        if state.get("method") != self.method:
            raise ValueError(f"state was saved by {state.get('method')!r}, not {self.method!r}")
        saved = state.get("config")
        if saved is None:  # states written before settings lived in a config
            saved = {k: state[k] for k in ("seed", "eps", "kind", "weight_decay") if k in state}
            diffs = self.config.differences(saved, keys=saved)
        else:
            diffs = self.config.differences(saved)
        if diffs:
            raise ValueError(
                f"the saved {self.method} state has other settings than this optimizer ({'; '.join(diffs)}); "
                "build the optimizer with the saved settings to resume"
            )
        trajectory = Trajectory.from_dict(state["trajectory"])
        self.check_trajectory(trajectory)
        self.step_count = state["step_count"]
        self.forward_passes = state["forward_passes"]
        self.skipped_steps = state["skipped_steps"]
        self.torch_optimizer.load_state_dict(state["torch_optimizer"])
        self.trajectory = trajectory
        if self.stateful:  # the buffers come separately (load_state_tensors); until then no step can run
            self.state = None if trajectory.records else {}
        if "lr_schedule" in state and isinstance(self.lr_schedule, torch.optim.lr_scheduler.LRScheduler):
            self.lr_schedule.load_state_dict(state["lr_schedule"])

    def check_trajectory(self, trajectory: Trajectory) -> None:
        """Refuse a saved trajectory whose constants or parameters are not this optimizer's."""
        fresh = self._new_trajectory()
        mine, theirs = fresh.constants(), trajectory.constants()
        diffs = [f"{k}: saved {theirs.get(k)!r}, here {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if trajectory.model is not None and trajectory.model != fresh.model:
            diffs.append("the model's parameters differ from the saved run's model")
        if [p.name for p in trajectory.params] != [p.name for p in fresh.params]:
            diffs.append("the trainable parameters differ")
        else:
            diffs += _spec_diffs(trajectory, fresh)
        if diffs:
            raise ValueError(f"the saved trajectory does not belong to this optimizer ({'; '.join(diffs)})")


class SeveralDirections:
    """For a method that evaluates ``config.n_directions`` directions a step (FZOO, ES)."""

    @property
    def n_directions(self) -> int:
        return self.config.n_directions

    def _seeds(self) -> list[int]:
        return self.step_seeds(self.n_directions)


def _refuse_fsdp(model: torch.nn.Module, params: dict) -> None:
    """FSDP2 / DTensor parameters: refused, because the update would silently miss the shards.

    FSDP2 keeps the sharded DTensors as the truth and all-gathers them into temporary full
    tensors around a forward; torch.export cannot trace that all-gather, and a model compiled
    after an eager forward captures the temporary full tensors, whose updates FSDP2 discards.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support has neither
        return
    sharded = [n for n, p in params.items() if isinstance(p, DTensor)]
    sharded += [f"{type(m).__name__} (fully_shard)" for m in model.modules() if isinstance(m, FSDPModule)]
    if sharded:
        raise ValueError(
            f"{sharded[:3]}{' ...' if len(sharded) > 3 else ''}: the model is sharded by FSDP2 (fully_shard) or "
            "holds DTensor parameters (tensor parallelism); zo_fx does not compose with them yet (torch.export "
            "cannot capture FSDP2's all-gather hooks, and updates to its gathered copies are discarded). Train the "
            "unsharded model with strategy='directions' or 'data', or keep flat shards "
            "yourself and update them with Trajectory.apply(..., shards=...) (see zo_fx.optim.distributed)"
        )


def _spec_diffs(saved: Trajectory, fresh: Trajectory) -> list[str]:
    """Shapes, dtypes, stream ids and ties of the saved parameters against this optimizer's (format 2)."""
    diffs = []
    for a, b in zip(saved.params, fresh.params):
        if a.pid != b.pid or a.decay != b.decay:
            diffs.append(f"{a.name}: stream id or weight decay differs")
        if a.shape is not None and (tuple(a.shape), a.dtype, tuple(a.aliases)) != (b.shape, b.dtype, b.aliases):
            diffs.append(f"{a.name}: saved {list(a.shape)} {a.dtype} tied {list(a.aliases)}, "
                         f"here {list(b.shape)} {b.dtype} tied {list(b.aliases)}")
    return diffs
