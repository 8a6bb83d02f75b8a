"""The job's settings and their defaults: what ``zo-fx finetune`` can be asked to do, checked on entry.

Every flag of the CLI is a field of :class:`FinetuneConfig`, validated in ``__post_init__`` so a
bad value fails with a :class:`FinetuneError` before any data or model is loaded. The default
learning rates and step count live here, beside the measurements they were chosen from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from zo_fx.finetune.peft_methods import PEFT_METHODS, PeftSetupError, canonical, read_peft_config_file, refusal

METHODS = ("fzoo", "mezo", "adamezo", "es", "zosgd_momentum", "zoadam", "hizoo", "adam")
#: --peft: full fine-tuning, or a PEFT method zo_fx builds (zo_fx.finetune.peft_methods; others are refused)
PEFTS = ("none", *PEFT_METHODS)
LR_SCHEDULES = ("constant", "linear")
#: --direction-kind: element-wise signs or normals, or rank-r products A B^T on every matrix (--rank)
DIRECTION_KINDS = ("rademacher", "gaussian", "lowrank")
#: built-in tasks whose objective is a reward on generated text (zo_fx.tasks.countdown)
REWARD_TASK_NAMES = ("countdown", "arithmetic")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

# Learning rates, from sweeps on SmolLM2-135M-Instruct / VADER (B=16, eps=1e-3, seed 0) on this 2-core CPU.
# FZOO's step is normalised by the loss spread, so its lr is a step size per direction, far above MeZO's.
# Full fine-tuning, 30 FZOO steps (270 forward passes), validation accuracy (zero-shot 0.798):
#   FZOO lr 3e-4: 0.810, 1e-3: 0.868, 3e-3: 0.911, 1e-2: 0.858.
# Full fine-tuning, 270 forward passes, loss on 64 fixed training examples (start 0.438):
#   MeZO 1e-5: 0.394, 1e-4: 0.334;  Adam (30 steps) 1e-5: 0.160, 1e-4: 0.189.
#   AdaMeZO (10 s a step here) was not swept: its lr keeps the AdaMeZO/MeZO ratio of the LoRA sweep, 1/100.
#: the shortest --max-length a prompt fits in (a few text tokens and the template's end)
MIN_MAX_LENGTH = 8
# ES's coefficients are shaped-rank differences (about 0.5) over (2N * eps): about 31 per direction at N=8,
# eps=1e-3, against about 1/N = 0.125 for FZOO's, so its lr is FZOO's over 250 (not swept; at 1e-5 with LoRA,
# 10x below that, the convergence benchmark's ES barely moved: probe loss 0.438 -> 0.418 in 450 passes).
# ZO-SGD with momentum sums about 1 / (1 - beta) = 10 past estimates, so its lr is MeZO's over 10; ZO-Adam's
# step is normalised like Adam's and takes Adam's lr (neither swept). HiZOO's step is MeZO's while its
# curvature H is ones and only shrinks as H grows, so it takes MeZO's lr (not swept).
DEFAULT_LR = {"fzoo": 3e-3, "mezo": 1e-4, "adamezo": 1e-6, "es": 1e-5, "zosgd_momentum": 1e-5, "zoadam": 1e-5,
              "hizoo": 1e-4, "adam": 1e-5}
# Adapters (--peft), swept with LoRA r=8 over 270 forward passes, final moving-average training loss:
#   FZOO 3e-3: 0.435, 1e-2: 0.367, 3e-2: 0.303, 1e-1: 1.17 (diverged);
#   MeZO 1e-4: 0.500, 3e-4: 0.493, 1e-3: 0.470, 3e-3: 0.572, 1e-2: 0.826;
#   AdaMeZO 1e-6: 0.499, 1e-5: 0.464, 1e-4: ~0.7 (unstable);
#   Adam (30 steps) 1e-4: 0.395, 1e-3: 0.213, 1e-2: 0.449.
# FZOO's default is 1e-2, not 3e-2: at a constant 3e-2 the benchmark's 450-forward-pass runs fall fastest,
# then turn unstable (probe loss 0.28 at 270 forward passes, 0.48 at the end; seeds 0 and 1), while 1e-2
# ends at 0.29. 3e-2 decayed linearly to 0 ends at 0.22 (benchmarks/convergence.py; here: --lr 3e-2
# --lr-schedule linear). Prefix and prompt tuning use these values too (not swept).
DEFAULT_PEFT_LR = {"fzoo": 1e-2, "mezo": 1e-3, "adamezo": 1e-5, "es": 4e-5, "zosgd_momentum": 1e-4,
                   "zoadam": 1e-3, "hizoo": 1e-3, "adam": 1e-3}
# The default run (no flags) must finish in about 10 minutes on a 2-core CPU, load and evaluations included.
# Measured (`zo-fx finetune --threads 2`, quiet machine): 4 min 33 s wall, of which 142 s are the 30 FZOO
# steps (9 forward passes of 16 examples each) and the rest model load, compile and evaluations; test
# accuracy 0.770 zero-shot -> 0.900, validation 0.798 -> 0.911 (8 min 21 s at one thread on a shared machine).
DEFAULT_STEPS = 30
DEFAULT_EVALS = 3


class FinetuneError(Exception):
    """A mistake in the job's inputs; the message says what was wrong and what to do."""


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning job needs; ``zo-fx finetune --help`` documents each field.

    ``lr=None`` takes the method's :data:`DEFAULT_LR` (:data:`DEFAULT_PEFT_LR` with an adapter).
    ``steps`` and ``forward_budget`` both bound the run; with neither, :data:`DEFAULT_STEPS`.
    ``eval_every=None`` evaluates :data:`DEFAULT_EVALS` times over the run; ``checkpoint_every=None``
    checkpoints with each evaluation (and always at the end).
    """

    model: str = "smollm2"
    task: str = "vader"
    label_words: str | None = None
    template: str | None = None
    data_dir: str | None = None
    method: str = "fzoo"
    peft: str = "none"
    peft_config: str | None = None
    steps: int | None = None
    forward_budget: int | None = None
    lr: float | None = None
    lr_schedule: str = "constant"
    eps: float = 1e-3
    directions: int = 8
    horizon: int = 10
    weight_decay: float = 0.0
    batch_size: int = 16
    max_length: int = 128
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    dtype: str = "float32"
    threads: int | None = None
    reward: str | None = None
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    demonstrations: int = 0
    direction_kind: str | None = None
    rank: int | None = None
    lazy_steps: int | None = None

    def __post_init__(self) -> None:
        self._check_peft()
        for name, allowed in (("method", METHODS), ("dtype", tuple(DTYPES)),
                              ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in allowed:
                flag = name.replace("_", "-")
                raise FinetuneError(f"--{flag} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = ("batch_size", "max_length", "directions", "horizon", "steps", "forward_budget",
                    "eval_every", "checkpoint_every", "threads", "max_new_tokens", "top_k")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1; got {value}")
        if self.direction_kind is not None and self.direction_kind not in DIRECTION_KINDS:
            raise FinetuneError(f"--direction-kind {self.direction_kind!r} is not one of {', '.join(DIRECTION_KINDS)}")
        if self.rank is not None and self.direction_kind != "lowrank":
            raise FinetuneError(f"--rank {self.rank} is the rank of low-rank directions; add --direction-kind lowrank")
        if self.lazy_steps is not None and (self.direction_kind != "lowrank" or self.lazy_steps < 1):
            raise FinetuneError(f"--lazy-steps {self.lazy_steps} keeps low-rank factors for several steps: it needs "
                                "--direction-kind lowrank and a value of at least 1")
        if self.method == "hizoo" and self.direction_kind not in (None, "gaussian"):
            raise FinetuneError(f"--method hizoo estimates a diagonal curvature from Gaussian directions; "
                                f"--direction-kind {self.direction_kind} cannot give it (leave it out)")
        if self.rank is not None and not 1 <= self.rank <= 256:
            raise FinetuneError(f"--rank must be between 1 and 256; got {self.rank}")
        if self.method == "adam" and self.direction_kind is not None:
            raise FinetuneError("--direction-kind is for the zeroth-order methods; --method adam takes gradients")
        if self.demonstrations < 0:
            raise FinetuneError(f"--demonstrations must be 0 or more; got {self.demonstrations}")
        if self.max_length < MIN_MAX_LENGTH:
            raise FinetuneError(
                f"--max-length {self.max_length} leaves no room for a prompt: each example needs its text and the "
                f"position that predicts the label word; use at least {MIN_MAX_LENGTH} (default 128)")
        if self.method == "fzoo" and self.directions < 2:
            raise FinetuneError(
                f"FZOO needs --directions >= 2 to estimate the loss spread; got {self.directions}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneError(f"--lr must be a positive number; got {self.lr}")
        top = torch.finfo(DTYPES[self.dtype]).max
        for flag, value in (("--lr", self.lr), ("--eps", self.eps)):
            if value is not None and math.isfinite(value) and value > top:
                raise FinetuneError(f"{flag} {value:g} is above the largest {self.dtype} value ({top:g}): the "
                                    f"weights cannot hold such a step; use a smaller {flag} or a wider --dtype")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FinetuneError(f"--weight-decay must be a number >= 0; got {self.weight_decay}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise FinetuneError(f"--eps must be a positive number; got {self.eps}")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise FinetuneError(f"--temperature must be a positive number; got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise FinetuneError(f"--top-p must be in (0, 1]; got {self.top_p}")
        if self.resume and self.output_dir is None:
            raise FinetuneError("--resume needs --output-dir: the folder of the run to continue")

    def _check_peft(self) -> None:
        """``--peft`` spelled canonically, or refused with the reason; ``--peft-config`` read and checked now,
        before any data or model loads, and its method taking the place of ``--peft``."""
        self.peft_fields = None
        if self.peft_config is not None:
            try:
                method, self.peft_fields = read_peft_config_file(self.peft_config)
            except PeftSetupError as err:
                raise FinetuneError(str(err)) from None
            self.peft = method
            return
        reason = refusal(self.peft)
        if reason:
            raise FinetuneError(reason)
        self.peft = canonical(self.peft)

    @property
    def is_reward_task(self) -> bool:
        """A task scored by rewards on generated text: a built-in reward task, or any task with --reward."""
        return self.reward is not None or self.task.lower() in REWARD_TASK_NAMES

    def direction_settings(self) -> dict:
        """The direction kind given on the command line, as the optimizers take it (empty: the method's own)."""
        if self.direction_kind is None:
            return {}
        lowrank = self.direction_kind == "lowrank"
        return {"kind": self.direction_kind, **({"rank": self.rank} if lowrank else {}),
                **({"lazy_steps": self.lazy_steps} if lowrank and self.lazy_steps else {})}

    def generation_args(self) -> dict:
        """The generation settings given on the command line (the model's generation config fills the rest)."""
        args = {"do_sample": self.do_sample} if self.do_sample else {}
        for key in ("temperature", "top_k", "top_p"):
            if getattr(self, key) is not None:
                args[key] = getattr(self, key)
        return args

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return (DEFAULT_LR if self.peft == "none" else DEFAULT_PEFT_LR)[self.method]

    def lr_at(self, step: int) -> float:
        """The lr of step ``step`` (0-based): constant, or decayed linearly to 0 over the run's steps."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        return linear_decay(self.learning_rate, step, self.total_steps)

    @property
    def per_step_forward_passes(self) -> int:
        return forward_passes_per_step(self.method, self.directions)

    @property
    def total_steps(self) -> int:
        bounds = [b for b in (self.steps, None if self.forward_budget is None
                              else self.forward_budget // self.per_step_forward_passes) if b is not None]
        if bounds and min(bounds) < 1:
            raise FinetuneError(
                f"--forward-budget {self.forward_budget} does not pay for one {self.method} step "
                f"({self.per_step_forward_passes} forward passes); raise it"
            )
        return min(bounds) if bounds else DEFAULT_STEPS

    def resolved(self) -> dict:
        """The settings as the run used them (defaults filled in), for metrics.json and resume checks."""
        out = asdict(self)
        out.update(lr=self.learning_rate, steps=self.total_steps, peft_fields=self.peft_fields)
        return out


def forward_passes_per_step(method: str, directions: int) -> int:
    """Forward passes over the batch per step of ``method`` (Adam's backward pass is not counted)."""
    return {"fzoo": directions + 1, "es": 2 * directions, "hizoo": 3, "adam": 1}.get(method, 2)


def linear_decay(lr: float, step: int, total: int) -> float:
    """``lr`` at 0-based ``step`` of ``total``, decayed linearly to 0 (``--lr-schedule linear``)."""
    return lr * max(0.0, 1.0 - step / total)
