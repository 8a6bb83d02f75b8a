"""The reference every test compares against: the eager model with its weights explicitly perturbed."""

from contextlib import contextmanager

import torch

from zo_fx.losses import default_loss
from zo_fx.passes.capture import model_output_tensor


@contextmanager
def perturbed_in_place(model, zm, seed, coef, eps, kind):
    """Inside: ``model``'s weights are ``theta + eps * coef * u(seed)``; restored bit for bit after."""
    params = dict(model.named_parameters())
    direction = zm.direction(seed, kind)
    saved = {n: params[n].detach().clone() for n in direction}
    with torch.no_grad():
        for n, u in direction.items():
            params[n].add_(eps * coef * u)
        try:
            yield model
        finally:
            for n, v in saved.items():
                params[n].copy_(v)


def explicit_group_losses(model, zm, batch, table, loss_fn=None):
    """The reference: perturb the eager model's weights in place, forward, restore."""
    loss_fn = loss_fn or default_loss(model)
    inputs = {k: v for k, v in batch.items() if k in zm.captured.input_keys}
    whole = zm.captured.outputs is not None  # the loss reads the whole output object, not the logits
    out = []
    for seed, coef in zip(table.seeds, table.coefs):
        with perturbed_in_place(model, zm, seed, coef, table.eps, table.kind):
            outputs = model(**inputs)
            if not whole:
                outputs = model_output_tensor(outputs)  # .logits, or the tensor a plain module returns
        out.append(loss_fn(outputs, batch))
    return torch.stack(out)
