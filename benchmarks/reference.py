"""The baselines zo_fx is measured against, written from the algorithms, not from zo_fx.

These run the update rules the way the published reference code runs them, because that is the
cost the DESIGN targets compare with:

* FZOO (Dang et al., ICLR 2026; reference code: the FZOO repository's trainer, ``zo_step`` /
  ``zo_update``; algorithm box of the poster, ``seeds/000``): per direction, perturb every weight in
  place with fresh Rademacher signs from torch's generator, forward, restore; then N update passes
  that regenerate each direction from its seed. That is 3N passes over all weights plus N+1
  sequential forwards per step.
* MeZO (Malladi et al., NeurIPS 2023, Algorithm 1; reference code ``large_models/trainer.py``
  ``zo_perturb_parameters`` / ``zo_step`` / ``zo_update``): two-sided Gaussian estimate, four
  passes over all weights (+eps, -2eps, +eps, update) and two forwards.
* AdamW with backprop (``torch.optim.AdamW``), the first-order baseline.
* The floor: the plain no-grad forward over the same (N+1)*B examples, without any perturbation.

Deliberate simplifications, none of which changes the cost: no weight decay (the benchmarks use
none), seeds may be passed in (for tests) instead of always being drawn, and the in-place writes use
``add_`` where the reference rebinds ``param.data`` (same arithmetic, one allocation fewer). Losses
are the model's own mean causal-LM loss, ``model(**batch).loss``; only zo_fx needs per-group losses.
Nothing here imports zo_fx, so a bug there cannot hide in its own baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["adam_step", "floor_forward", "reference_fzoo_step", "reference_mezo_step"]

FLOOR_MODES = ("one_batch", "per_copy")


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    # model.parameters() yields a tied weight (embedding = LM head) once: one direction per weight.
    return [p for p in model.parameters() if p.requires_grad]


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    return model(**batch).loss.item()


def _draw_seeds(n: int) -> list[int]:
    # The reference draws np.random.randint(1_000_000_000) per direction; torch's global RNG here.
    return torch.randint(1_000_000_000, (n,)).tolist()


def _add_noise_(params: list[nn.Parameter], seed: int, scale: float, kind: str) -> None:
    """``p += scale * z`` for every parameter, z drawn param by param from a generator seeded once.

    Regenerating with the same seed and parameter order reproduces z exactly, which is how the
    reference restores the weights and later applies the update without ever storing z.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for p in params:
        gen = generators.get(p.device)
        if gen is None:
            gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        if kind == "rademacher":
            z = torch.randint(0, 2, p.shape, generator=gen, device=p.device, dtype=p.dtype) * 2 - 1
        else:
            z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        p.data.add_(z, alpha=scale)


@torch.no_grad()
def reference_fzoo_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    eps: float,
    lr: float,
    n: int,
    seeds: Sequence[int] | None = None,
) -> dict:
    """One FZOO step as the reference code runs it (in-place perturb / forward / restore).

    ``l_0`` at theta; ``l_i`` at theta + eps*u_i for n Rademacher directions u_i;
    ``sigma = std(l_1..l_n)`` (population, ``unbiased=False``); ``coef_i = (l_i - l_0) / (n*sigma)``;
    ``theta -= lr * coef_i * u_i`` for each i, regenerating u_i from its seed. The code's form has no
    1/eps (the poster writes g/sigma with one); it is scale-free and is the one the paper's learning
    rates belong to. sigma = 0 or a non-finite loss skips the update (``"skipped": True``).

    Args:
        model: the causal LM; its trainable parameters are updated in place.
        batch: ``input_ids``, ``attention_mask``, ``labels``.
        eps: perturbation scale.
        lr: learning rate.
        n: number of directions.
        seeds: one seed per direction; drawn from torch's global RNG when None.

    Returns:
        ``{"loss", "losses", "sigma", "coefs", "seeds", "skipped"}``; ``loss`` is l_0.
    """
    params = _trainable(model)
    seeds = _draw_seeds(n) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries, n={n} directions need one each")
    l0 = _loss(model, batch)
    losses = []
    for seed in seeds:
        _add_noise_(params, seed, eps, "rademacher")
        losses.append(_loss(model, batch))
        _add_noise_(params, seed, -eps, "rademacher")
    ls = torch.tensor(losses, dtype=torch.float64)
    sigma = ls.std(correction=0).item()
    info = {"loss": l0, "losses": losses, "sigma": sigma, "coefs": [], "seeds": seeds, "skipped": True}
    if not (sigma > 0 and torch.isfinite(ls).all() and torch.isfinite(torch.tensor(l0))):
        return info
    coefs = ((ls - l0) / (n * sigma)).tolist()
    for seed, coef in zip(seeds, coefs):
        _add_noise_(params, seed, -lr * coef, "rademacher")
    return {**info, "coefs": coefs, "skipped": False}


@torch.no_grad()
def reference_mezo_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    eps: float,
    lr: float,
    seed: int | None = None,
) -> dict:
    """One MeZO step (Malladi et al. 2023, Algorithm 1) with Gaussian z, in place.

    theta + eps*z -> l+; theta - eps*z -> l-; restore; ``p = (l+ - l-) / (2 eps)``;
    ``theta -= lr * p * z``, z regenerated from the seed each time.

    Returns:
        ``{"loss", "loss_plus", "loss_minus", "projected_grad", "seed"}``; ``loss`` is (l+ + l-)/2,
        the loss the reference logs.
    """
    params = _trainable(model)
    seed = _draw_seeds(1)[0] if seed is None else seed
    _add_noise_(params, seed, eps, "gaussian")
    loss_plus = _loss(model, batch)
    _add_noise_(params, seed, -2 * eps, "gaussian")
    loss_minus = _loss(model, batch)
    _add_noise_(params, seed, eps, "gaussian")
    projected_grad = (loss_plus - loss_minus) / (2 * eps)
    _add_noise_(params, seed, -lr * projected_grad, "gaussian")
    return {
        "loss": (loss_plus + loss_minus) / 2,
        "loss_plus": loss_plus,
        "loss_minus": loss_minus,
        "projected_grad": projected_grad,
        "seed": seed,
    }


def adam_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """One backprop step: forward, backward, ``optimizer.step()``, then free the gradients.

    Gradients are dropped (``set_to_none``) *after* the step rather than before the next forward,
    so between steps only weights and optimizer state are alive, the leanest order for memory.

    Returns:
        The batch loss before the update.
    """
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def floor_forward(model: nn.Module, batch: dict[str, torch.Tensor], n_copies: int, mode: str) -> float:
    """Push ``n_copies`` copies of the batch (N+1 for FZOO) through the unperturbed model, no grad.

    This is the least work any method that evaluates N+1 groups of B examples must do. Which way is
    faster depends on the machine, so both exist: ``"one_batch"`` concatenates the copies into one
    forward over ``n_copies*B`` examples (wins on GPUs); ``"per_copy"`` runs ``n_copies`` forwards over
    B examples (won on a 2-core CPU: 4.9 s vs 6.1 s for SmolLM2-135M, 9 x 16 examples, T=24).

    Returns:
        The mean loss over the copies (read back, as a ZO method must read its losses).
    """
    if mode == "one_batch":
        big = {k: v.repeat(n_copies, *([1] * (v.dim() - 1))) for k, v in batch.items()}
        return _loss(model, big)
    if mode == "per_copy":
        return sum(_loss(model, batch) for _ in range(n_copies)) / n_copies
    raise ValueError(f"unknown floor mode {mode!r}; use one of {FLOOR_MODES}")
