"""Two-dimensional toy objectives (AdaMeZO paper, section 5.1) written as tiny modules."""

from __future__ import annotations

import torch


class Toy2D(torch.nn.Module):
    """theta in R^2; the output is the objective f(theta), once per example of the batch."""

    def __init__(self, objective, start):
        super().__init__()
        self.objective = objective
        self.theta = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, x):
        value = self.objective(self.theta[0], self.theta[1])
        return value * torch.ones_like(x[:, 0])


def rosenbrock(a, b):
    return (1 - a) ** 2 + 100 * (b - a * a) ** 2


def ill_conditioned_quadratic(a, b):
    return 0.5 * (a * a + 100 * b * b)


TOYS = {
    "rosenbrock": (rosenbrock, [-1.0, 1.5]),
    "quadratic": (ill_conditioned_quadratic, [3.0, 1.0]),
}


def toy_batch(batch_size=2):
    return {"x": torch.zeros(batch_size, 1, dtype=torch.float64)}


def identity_loss(outputs, batch):
    return outputs
