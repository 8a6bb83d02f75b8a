"""Which implementation runs a perturbation-aware op: the Triton kernel or its torch reference.

The one place where ``impl`` is interpreted. Every entry point in :mod:`zo_fx.kernels`
and every graph op asks :func:`pick`; a fallback from ``impl="triton"`` is announced
once per reason, never silent, and the reference computes the same function.
"""

from __future__ import annotations

import warnings

import torch

#: the values of every ``impl`` argument in zo_fx
IMPLS = ("auto", "torch", "triton")

# reasons already reported by pick(): each fallback is announced once per process
_warned: set[str] = set()


def _triton_importable() -> bool:
    from ._support import HAS_TRITON

    return HAS_TRITON


def triton_available() -> bool:
    """Whether Triton kernels can run here: Triton imports, and there is a GPU or the interpreter is on."""
    from ._support import interpreting

    return _triton_importable() and (torch.cuda.is_available() or interpreting())


def _why_not_triton(tensor: torch.Tensor, others) -> str | None:
    """The reason the kernels cannot take ``tensor`` here, or None when they can."""
    from ._support import KERNEL_DTYPES, interpreting, kernels_interpreted

    if not _triton_importable():
        return "Triton is not installed"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (tensor, *others)):
        return "the kernels have no backward pass; call under torch.no_grad() to use them"
    if tensor.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in KERNEL_DTYPES)
        return f"the kernels take {names} tensors, not {str(tensor.dtype).replace('torch.', '')}"
    if tensor.device.type == "cuda":
        return None
    if not interpreting():
        return f"a {tensor.device.type} tensor needs TRITON_INTERPRET=1 (the Triton CPU interpreter)"
    if kernels_interpreted() is False:
        return (
            "the kernels were compiled before TRITON_INTERPRET=1 was set; "
            "set it before importing zo_fx.kernels"
        )
    return None


def pick(impl: str, tensor: torch.Tensor, *others: torch.Tensor | None) -> str:
    """Which implementation runs an op on ``tensor``: ``"triton"`` or ``"torch"``.

    Args:
        impl: ``"auto"`` uses Triton for CUDA tensors when it can, torch everywhere else;
            ``"torch"`` always the reference; ``"triton"`` the kernel, or the reference with
            a one-time warning saying why when the kernel cannot run (Triton missing, a CPU
            tensor without ``TRITON_INTERPRET=1``, a dtype such as float64, a tensor that
            autograd tracks). A fallback is never silent, and the reference computes the
            same function, so it is never wrong.
        tensor: the tensor whose device and dtype decide (the op's main input).
        others: the op's other tensors (its weights, None allowed): the kernels are also
            refused when autograd tracks one of them.

    Example:
        >>> pick("auto", torch.zeros(2))
        'torch'
    """
    if check_impl(impl) == "torch":
        return "torch"
    reason = _why_not_triton(tensor, others)
    if impl == "auto":
        return "triton" if reason is None and tensor.device.type == "cuda" else "torch"
    if reason is None:
        return "triton"
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"impl='triton' falls back to the torch reference: {reason}", stacklevel=3)
    return "torch"




def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    return impl


__all__ = ["IMPLS", "check_impl", "pick", "triton_available"]
