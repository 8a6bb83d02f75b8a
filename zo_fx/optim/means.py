"""Group means over the examples whose losses are finite in every group.

One example with a non-finite loss (an overflow on one odd input, a reward that failed)
would make every group's mean non-finite and cost the whole step. Dropping that example
from *all* groups alike keeps the estimate a comparison of the same examples under
different perturbations, so it stays unbiased over the remaining ones; the step reports
which examples it dropped. When no example is finite in every group the means stay
non-finite and the step is skipped, as before.
"""

from __future__ import annotations

import torch


def finite_columns(losses: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the examples of a ``[G, B]`` loss table that are finite in every group."""
    return torch.isfinite(losses).all(0)


def example_means(losses: torch.Tensor) -> tuple[list[float], list[int]]:
    """(G group means, dropped example indices) of a ``[G, B]`` float64 loss table.

    With every example finite the means are ``losses.mean(1)`` bit for bit; otherwise they are
    the means over the finite examples; with none finite, the plain (non-finite) means.
    """
    good = finite_columns(losses)
    if bool(good.all()) or not bool(good.any()):
        return [float(v) for v in losses.mean(1).tolist()], []
    dropped = [int(i) for i in (~good).nonzero().flatten().tolist()]
    return [float(v) for v in losses[:, good].mean(1).tolist()], dropped
