"""Native CPU kernels for the torch paths: perturbed tiles, the fused update, embedding rows.

The torch references expand Philox words to signs with int64 tensor ops; on CPU that is
several passes over memory per element and does not vectorise well on every machine. The
C source next to this file (``zo_native.c``) does the same arithmetic in one vectorised
loop per tile. It is compiled at first use with the machine's C compiler (``$CC`` or
``gcc``; ``-O3 -march=native -ffp-contract=off``), cached under
``$ZO_FX_CACHE_DIR`` (default ``~/.cache/zo_fx/native``) in a file named by a hash of
the source, the flags, the compiler's version and the CPU's feature flags, and loaded with
:mod:`ctypes`: no torch headers, no ninja, about a second to build.

What it computes (docs/native.md):

* Rademacher perturbed tiles, the fused Rademacher update and Rademacher embedding rows:
  bit for bit what the torch references give (signs from the frozen layout, the same
  float operations in the same order, one rounding to the weight's dtype).
* Gaussian: the kernel's own Box-Muller (fdlibm's logf, Cephes' float32 sin/cos on a remainder
  reduced in double precision, each within 1 ulp of correctly rounded; the layout's float32 steps
  around them): within a few float32 ulps of torch's
  functions and the same bits on every CPU. The eager torch paths take their Gaussian values
  from it too (:func:`normals_from_words`, registered with the layout), so the kernels, the
  references and ``direction()`` agree bit for bit on CPU.

Switches: ``ZO_FX_NATIVE=0`` turns the native path off (every caller then runs the torch
reference). A machine where the source does not compile warns once, with the compiler's
first lines, and uses the torch path. ``ZO_FX_NATIVE_THREADS`` overrides the thread
count (default ``torch.get_num_threads()``); the kernel splits work into whole
2048-element pieces, never the arithmetic of an element, so results do not depend on it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from zo_fx.streams import layout
from zo_fx.streams.layout import GAUSSIAN, RADEMACHER, key_tensors

SOURCE = Path(__file__).with_name("zo_native.c")
#: flags of every build; -ffp-contract=off keeps products and sums rounded separately, as torch does
BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-fast-math",
              "-fno-math-errno")
#: tried first; a compiler that refuses it gets a build without it
ARCH_FLAGS = ("-march=native",)
#: on x86, tried before ARCH_FLAGS alone: gcc's tuning for AVX-512 CPUs vectorises loops in 256-bit
#: halves, and a 512-bit load of what two 256-bit stores just wrote stalls on store forwarding (the
#: Rademacher bf16 tiles ran at 1.5 instead of 6.6 G elements/s on an Intel Xeon). Without AVX-512 the
#: preference changes nothing.
WIDE_VECTOR_FLAGS = ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64", "i686") else ()
#: tried first too: the kernel's threads are then torch's own OpenMP pool (zo_native.c, parallel_units)
OPENMP_FLAGS = ("-fopenmp",)
ABI_VERSION = 4
#: dtype codes of the C entry points
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
#: distinct seeds one call of the tile and embedding kernels takes (the C side's MAX_SEEDS)
MAX_SEEDS = 64

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None; "error": why not; "path": the .so


def enabled() -> bool:
    """Whether the native path is asked for (``ZO_FX_NATIVE`` is not ``0``)."""
    return os.environ.get("ZO_FX_NATIVE", "1") != "0"


def threads() -> int:
    """Threads a kernel call uses: ``ZO_FX_NATIVE_THREADS``, else torch's intra-op thread count."""
    text = os.environ.get("ZO_FX_NATIVE_THREADS")
    if text:
        return max(1, int(text))
    return max(1, torch.get_num_threads())


def cache_dir() -> Path:
    root = os.environ.get("ZO_FX_CACHE_DIR")
    if root:
        return Path(root) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "zo_fx" / "native"


def _compiler() -> str:
    return os.environ.get("CC", "gcc")


def _cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key: -march=native code is this CPU's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile the source to ``target`` (atomically); the compiler's output on failure, else None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout or f"{cc} exited with {proc.returncode}").strip()
        os.replace(tmp, target)  # another process building the same key replaces it with the same bytes
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cc}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib) -> None:
    p, i64, u64, i32, u32, f64 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint32,
                                  ctypes.c_double)
    lib.zo_abi_version.restype = i32
    lib.zo_rademacher_tiles.argtypes = [i32, p, i64, u64, u64, i32, p, p, u32, u32, i32, p, p, p, i64, i32]
    lib.zo_gaussian_tiles.argtypes = lib.zo_rademacher_tiles.argtypes
    lib.zo_gaussian_values.argtypes = [p, i64, u64, u64, u32, u32, u32, u32]
    lib.zo_normals_from_words.argtypes = [p, p, p, p, i64, p]
    lib.zo_rademacher_update.argtypes = [i32, p, i64, u64, u64, i32, p, p, u32, u32, p, f64, f64, i32]
    lib.zo_gaussian_update.argtypes = lib.zo_rademacher_update.argtypes
    lib.zo_rademacher_embedding.argtypes = [i32, p, i64, p, i64, i32, p, p, u32, u32, i32, p, p, p, i32]
    lib.zo_gaussian_embedding.argtypes = lib.zo_rademacher_embedding.argtypes
    for name in ("zo_rademacher_tiles", "zo_gaussian_tiles", "zo_gaussian_values", "zo_normals_from_words",
                 "zo_rademacher_update", "zo_gaussian_update", "zo_rademacher_embedding", "zo_gaussian_embedding"):
        getattr(lib, name).restype = i32


def _load():
    """Build (or find in the cache) and load the library; None, with one warning, when it cannot be had."""
    cc = _compiler()
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    errors = []
    arch = [ARCH_FLAGS + WIDE_VECTOR_FLAGS] if WIDE_VECTOR_FLAGS else []
    tiers = [BASE_FLAGS + a + OPENMP_FLAGS for a in [*arch, ARCH_FLAGS]]
    tiers += [BASE_FLAGS + a for a in [*arch, ARCH_FLAGS]] + [BASE_FLAGS]
    for flags in tiers:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(), version.encode(),
                                         _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:20]
        path = cache_dir() / f"zo_native-{key}.so"
        if not path.exists():
            error = _build(cc, flags, path)
            if error is not None:
                errors.append(f"{cc} {' '.join(flags)}:\n" + "\n".join(error.splitlines()[:6]))
                continue
        try:
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.zo_abi_version() != ABI_VERSION:
                raise OSError(f"{path} has ABI {lib.zo_abi_version()}, expected {ABI_VERSION}")
        except OSError as exc:
            errors.append(f"loading {path}: {exc}")
            continue
        _state.update(path=str(path), flags=" ".join(flags), compiler=cc)
        return lib
    _state["error"] = "\n".join(errors)
    warnings.warn("zo_fx: the native CPU kernels could not be built, so the (slower) torch path runs instead. "
                  "Set ZO_FX_NATIVE=0 to silence this. The compiler said:\n" + _state["error"], RuntimeWarning,
                  stacklevel=3)
    return None


def library():
    """The loaded library, building it on first use; None when it is off or cannot be built."""
    if not enabled():
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def available() -> bool:
    return library() is not None


def info() -> dict:
    """What the native path is: on or off, where the library is, how it was built, or why it is not there."""
    lib = library()
    return {"enabled": enabled(), "loaded": lib is not None, "threads": threads(),
            **{k: v for k, v in _state.items() if k != "lib"}}


#: dispatch modes under which tensors are traced or fake: a ctypes call would escape the trace
_TRACING_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, name) for name in ("PROXY", "FAKE", "FUNCTIONAL")
                       if hasattr(torch._C._TorchDispatchModeKey, name))


def _plain(t: torch.Tensor) -> bool:
    """A real CPU tensor outside any tracing: not a subclass (fake, functional, DTensor...), no tracing mode on."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors now: CPU, a supported dtype, no autograd, not traced."""
    for t in tensors:
        if not _plain(t) or t.dtype not in DTYPE_CODES or not t.is_contiguous():
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    if _tracing():
        return False
    return library() is not None


# ---------------------------------------------------------------------------------------- helpers
# Small arguments travel as ctypes arrays built from Python lists: a handful of torch ops per
# call would cost more than forming a cache-sized tile.


def _ptr(t: torch.Tensor, offset: int = 0):
    return ctypes.c_void_p(t.data_ptr() + offset * t.element_size())


def _u32(values) -> ctypes.Array:
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    values = [values] if not isinstance(values, list) else values
    return (ctypes.c_uint32 * max(1, len(values)))(*[int(v) & 0xFFFFFFFF for v in values])


def _i32(values) -> ctypes.Array:
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    return (ctypes.c_int32 * max(1, len(values)))(*[int(v) for v in values])


def _f64(values) -> ctypes.Array:
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    values = [values] if not isinstance(values, list) else values
    return (ctypes.c_double * max(1, len(values)))(*[float(v) for v in values])


def _scalar(t) -> int:
    return int(t.item()) if isinstance(t, torch.Tensor) else int(t)


# ------------------------------------------------------------------------------------ entry points


def perturbed_tiles(base, scales, which, block0, seed_lo, seed_hi, pid, tag, kind: str, out=None, skip: int = 0):
    """``[G', n]``: blocked.py's ``_perturbed_tiles`` (same arguments; ``skip`` elements into ``block0``).

    ``out``: a contiguous ``[G', n]`` tensor of ``base``'s dtype to write into (a buffer reused
    over a weight's tiles spares the page faults of a fresh allocation per tile). None when the
    native path cannot take the call (the caller then runs the torch path).
    """
    lib = library()
    seeds = seed_lo.numel()
    if lib is None or seeds > MAX_SEEDS:
        return None
    n, code, nthreads = base.numel(), DTYPE_CODES[base.dtype], threads()
    groups = which.numel()
    if (out is None or out.shape != (groups, n) or out.dtype != base.dtype or not out.is_contiguous()
            or out.device.type != "cpu"):
        out = torch.empty(groups, n, dtype=base.dtype, device="cpu")
    if n == 0 or groups == 0:
        return out
    lo, hi, which_a, scales_a = _u32(seed_lo), _u32(seed_hi), _i32(which), _f64(scales)
    b0, pid_i, tag_i = _scalar(block0), _scalar(pid), _scalar(tag)
    fn = lib.zo_rademacher_tiles if kind == RADEMACHER else lib.zo_gaussian_tiles
    rc = fn(code, _ptr(base), n, b0, skip, seeds, lo, hi, pid_i, tag_i, groups, which_a, scales_a, _ptr(out), n,
            nthreads)
    return out if rc == 0 else None


def update_(view: torch.Tensor, coefs, lr, weight_decay, block0: int, skip: int, seed_lo, seed_hi, pid, tag,
            kind: str) -> bool:
    """In place on ``view``: update.py's ``_update_chunk``; False when the native path cannot take it."""
    lib = library()
    if lib is None:
        return False
    n, code, nthreads, seeds = view.numel(), DTYPE_CODES[view.dtype], threads(), seed_lo.numel()
    if n == 0:
        return True
    lo, hi, coefs_a = _u32(seed_lo), _u32(seed_hi), _f64(coefs)
    lr_f, wd_f = float(lr), float(weight_decay)
    pid_i, tag_i = _scalar(pid), _scalar(tag)
    fn = lib.zo_rademacher_update if kind == RADEMACHER else lib.zo_gaussian_update
    return fn(code, _ptr(view), n, block0, skip, seeds, lo, hi, pid_i, tag_i, coefs_a, lr_f, wd_f, nthreads) == 0


def normals_from_words(w0, w1, w2, w3) -> torch.Tensor | None:
    """``[..., 4]`` float32 normals of blocks whose Philox words are given (int64 tensors, broadcastable).

    :func:`zo_fx.streams.layout.normals_from_columns` calls this first, so that every eager torch path on
    CPU (direction(), the per-group and embedding references, the perturbation of small parameters) uses
    the kernel's Box-Muller too and agrees bit for bit with the native tiles and updates. None when the
    kernel cannot take them (not plain CPU int64 tensors, being traced, or no library): the caller then
    runs torch's functions.
    """
    words = (w0, w1, w2, w3)
    if not all(_plain(w) and w.dtype == torch.int64 for w in words) or _tracing():
        return None
    lib = library()
    if lib is None:
        return None
    columns = [w.contiguous() for w in torch.broadcast_tensors(*words)]
    out = torch.empty(*columns[0].shape, 4, dtype=torch.float32, device="cpu")
    if out.numel():
        lib.zo_normals_from_words(*(_ptr(c) for c in columns), columns[0].numel(), _ptr(out))
    return out


def gaussian_values(seed: int, pid: int, start: int, count: int) -> torch.Tensor | None:
    """The native kernel's float32 values of Gaussian stream elements ``[start, start + count)``.

    For tests and inspection: the kernels form tiles and updates from these same values. None when
    the library is not loaded.
    """
    lib = library()
    if lib is None:
        return None
    lo, hi, pid_t, tag = key_tensors([seed], pid, GAUSSIAN)
    out = torch.empty(count, dtype=torch.float32, device="cpu")
    if count:
        lib.zo_gaussian_values(_ptr(out), count, start // 4, start % 4, int(lo[0]), int(hi[0]), int(pid_t), int(tag))
    return out


def embedding(weight: torch.Tensor, ids: torch.Tensor, pid: int, seed_lo, seed_hi, tag: int, which, scales,
              kind: str) -> torch.Tensor | None:
    """``[G, T, D]``: rows ``ids`` (flat, in range) of ``weight`` plus each group's direction of ``kind``.

    Rademacher bit for bit the torch reference; Gaussian from the kernel's Box-Muller, which the reference
    takes its values from too (:func:`normals_from_words`), with the reference's arithmetic on them.
    """
    lib = library()
    seeds = seed_lo.numel()
    if lib is None or seeds > MAX_SEEDS:
        return None
    d = weight.shape[1]
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    groups = which.numel()
    out = torch.empty(groups, flat.numel(), d, dtype=weight.dtype, device="cpu")
    if out.numel() == 0:
        return out
    fn = lib.zo_rademacher_embedding if kind == RADEMACHER else lib.zo_gaussian_embedding
    rc = fn(DTYPE_CODES[weight.dtype], _ptr(weight), d, _ptr(flat), flat.numel(), seeds, _u32(seed_lo),
            _u32(seed_hi), pid, tag, groups, _i32(which), _f64(scales), _ptr(out), threads())
    return out if rc == 0 else None


def rademacher_signs(seeds, pid: int, tag: int, count: int, dtype) -> torch.Tensor | None:
    """``[G, count]`` Rademacher signs (+-1 in ``dtype``) of elements ``[0, count)`` of stream ``tag``, per seed.

    The tile kernel on a zero base with unit scales: ``0 + (+-1)`` is the sign exactly. Registered as
    :mod:`zo_fx.streams.layout`'s signs provider (low-rank factors). None when the kernel cannot run.
    """
    lib = library()
    if lib is None or dtype not in DTYPE_CODES or len(seeds) > MAX_SEEDS or _tracing():
        return None
    groups = len(seeds)
    out = torch.empty(groups, count, dtype=dtype, device="cpu")
    if out.numel() == 0:
        return out
    words = [layout.seed_words(s) for s in seeds]
    base = torch.zeros(count, dtype=dtype)
    rc = lib.zo_rademacher_tiles(DTYPE_CODES[dtype], _ptr(base), count, 0, 0, groups, _u32([w[0] for w in words]),
                                 _u32([w[1] for w in words]), pid, tag, groups, _i32(range(groups)),
                                 _f64([1.0] * groups), _ptr(out), count, threads())
    return out if rc == 0 else None


layout.register_normals_provider(normals_from_words)  # eager CPU Gaussian values are the kernel's too
layout.register_signs_provider(rademacher_signs)  # low-rank factors in one call instead of a few hundred ops

__all__ = ["available", "enabled", "gaussian_values", "info", "library", "normals_from_words", "perturbed_tiles",
           "embedding", "rademacher_signs", "threads", "update_", "usable"]
