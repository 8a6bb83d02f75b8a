"""Leave the user's model exactly as capture found it.

Tracing runs the model's Python code on symbolic values, and some models write what
they compute onto their own modules (Funnel keeps the sequence length and attention
structures of the last forward, RWKV flips a "layers rescaled" flag, others register
buffers or cache position tables). After a trace those attributes hold symbolic sizes or
fake tensors that belong to the trace: ``copy.deepcopy(model)`` then fails and a later
eager forward may read stale values. Capture also switches the model to eval mode.

:class:`ModuleState` records, for every module, its attribute dictionary and the contents
of every container in it (parameters, buffers, submodules, hooks, lists and dicts of
the model's own) before the trace, and puts them back afterwards: same objects, same
container contents, same training flags. Tensors that existed before are the same
tensor objects afterwards; their values are never touched by a trace (non-strict
export runs on fake copies), which the export itself checks (a forward that mutates
state is refused).
"""

from __future__ import annotations

import torch

_CONTAINERS = (dict, list, set)


def _contents(value):
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return set(value)


def _put_back(container, contents) -> bool:
    """Restore ``container``'s contents in place (its identity is kept); whether they had changed."""
    if isinstance(container, dict):
        changed = container.keys() != contents.keys() or any(container[k] is not v for k, v in contents.items())
    elif isinstance(container, list):
        changed = len(container) != len(contents) or any(a is not b for a, b in zip(container, contents))
    else:
        changed = container != contents
    if changed:
        container.clear()
        if isinstance(container, list):
            container.extend(contents)
        else:
            container.update(contents)
    return changed


class ModuleState:
    """A snapshot of every module's attributes (and of its containers' contents) that can be put back."""

    def __init__(self, model: torch.nn.Module):
        self._modules = []
        for name, module in model.named_modules(remove_duplicate=True):
            attrs = dict(vars(module))
            contents = {k: _contents(v) for k, v in attrs.items() if isinstance(v, _CONTAINERS)}
            self._modules.append((name, module, attrs, contents))

    def restore(self) -> list[str]:
        """Put every module back as recorded; the attributes that had changed (``module.attr``)."""
        changed = []
        for name, module, attrs, contents in self._modules:
            now = vars(module)
            for key in [k for k in now if k not in attrs]:
                del now[key]
                changed.append(f"{name or type(module).__name__}.{key} (added)")
            for key, value in attrs.items():
                current = now.get(key, _MISSING)
                if current is not value:
                    now[key] = value
                    if not _equal(current, value):
                        changed.append(f"{name or type(module).__name__}.{key}")
                if key in contents and _put_back(value, contents[key]):
                    changed.append(f"{name or type(module).__name__}.{key} (contents)")
        return changed


_MISSING = object()


def _equal(a, b) -> bool:
    """Whether a replaced attribute held an equal value (a rebuilt tuple, a copied config dict): not reported."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a is _MISSING:
        return False
    try:
        return bool(a == b)
    except Exception:  # values whose == raises or is not a truth value count as changed
        return False


class untouched:
    """Context manager: run the body with the model in eval mode, then put every module back as it was.

    ``changes`` lists what the body had changed (and was undone), for a report.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.changes: list[str] = []

    def __enter__(self):
        self._state = ModuleState(self.model)
        self.model.eval()
        return self

    def __exit__(self, *exc):
        self.changes = [c for c in self._state.restore() if not c.endswith(".training")]
        return False
