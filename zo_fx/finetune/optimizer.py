"""The optimizer of a job's ``--method``: a compiled zeroth-order one, or the backprop baseline.

:func:`build_optimizer` compiles the model with ``zo_compile`` for FZOO / MeZO / AdaMeZO
(turning a graph the compiler cannot take into a :class:`FinetuneError` that suggests what
to try) or builds :class:`AdamBaseline`. :func:`zo_optimizer` maps the job's flags onto the
settings each method's config takes and builds it through :mod:`zo_fx.optim.registry`.
"""

from __future__ import annotations

from pathlib import Path

from zo_fx.compile import zo_compile
from zo_fx.finetune.adam import AdamBaseline
from zo_fx.finetune.config import FinetuneConfig, FinetuneError
from zo_fx.optim.registry import build_optimizer as build_zo_optimizer
from zo_fx.passes.capture import ExportFailedError
from zo_fx.passes.rewrite import UncoveredParameterUseError, UnsupportedGraphError


def build_optimizer(cfg: FinetuneConfig, model, loss, example: dict, output_dir: Path):
    """The optimizer of ``cfg.method`` over ``model``; ``example`` is a training batch to compile with."""
    if cfg.method == "adam":
        return AdamBaseline(model, loss, cfg.learning_rate, cfg.weight_decay, output_dir, lr_at=cfg.lr_at)
    try:
        zm = zo_compile(model, example, loss=loss)
    except (ExportFailedError, UncoveredParameterUseError, UnsupportedGraphError, ValueError) as err:
        # ValueError: zo_compile's refusal of a model it cannot train as wrapped (e.g. an adapter whose
        # trainable parameters its forward never reads), said in the user's terms below
        hint = (" Prefix tuning feeds past key/values into attention, which this model's export may not "
                "take; try --peft lora." if cfg.peft == "prefix" else
                f" The --peft {cfg.peft} adapter is the likely cause; try --peft lora." if cfg.peft != "none" else "")
        raise FinetuneError(f"zo_compile could not prepare {type(model).__name__} for zeroth-order training: "
                            f"{err}.{hint} Or train with --method adam (backprop).") from None
    return optimizer_of(cfg, zm)


def optimizer_of(cfg: FinetuneConfig, zm):
    """The zeroth-order optimizer of ``cfg``'s flags over a compiled model."""
    schedule = cfg.lr_at if cfg.lr_schedule != "constant" else None
    try:
        return zo_optimizer(cfg.method, zm, lr=cfg.learning_rate, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            seed=cfg.seed, directions=cfg.directions, horizon=cfg.horizon, lr_schedule=schedule,
                            **cfg.direction_settings())
    except ValueError as err:  # a setting the model's weights cannot take (their dtype's range)
        raise FinetuneError(f"--{cfg.method}: {err}") from None


def zo_optimizer(method: str, zm, *, directions: int, horizon: int, lr_schedule=None, **common):
    """FZOO / MeZO / AdaMeZO over ``zm``; ``common`` holds the settings all methods take (lr, eps, seed, ...).

    ``directions`` goes only to FZOO (``n_directions``) and ``horizon`` only to AdaMeZO: a method's
    config refuses a setting it does not have. ``lr_schedule`` (step -> lr, or None) is the optimizer's.
    """
    own = {"fzoo": {"n_directions": directions}, "es": {"n_directions": directions},
           "adamezo": {"horizon": horizon}}.get(method, {})
    return build_zo_optimizer(method, zm, lr_schedule=lr_schedule, **common, **own)
