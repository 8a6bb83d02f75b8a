"""Step time and peak memory of zo_fx's optimizers against the reference algorithms and the floor.

All methods run side by side in one process on the same model, batch and machine, each on a fresh
copy of the weights, so the ratios (the DESIGN targets, section 7) are like for like:

    python benchmarks/step.py --model smollm2 --batch-size 16 --seq-len 24 --directions 8 \\
        --json runs/step_smollm2.json

Methods (``--methods``, comma separated; default all), with their forward passes over B examples:

* ``zo_fx_fzoo`` (N+1): ``zo_fx.FZOO(zm, n_directions=N).step(batch)``, ``zm = zo_fx.zo_compile(...)``
* ``zo_fx_fzoo_lowrank1``, ``zo_fx_fzoo_lowrank4`` (N+1): the same FZOO step with low-rank directions
  (``kind="lowrank", rank=r``): one shared GEMM per linear for all groups plus two rank-r GEMMs each
* ``zo_fx_mezo`` (2): ``zo_fx.MeZO(zm, kind="gaussian").step(batch)``
* ``zo_fx_adamezo`` (2): ``zo_fx.AdaMeZO(zm, horizon=K).step(batch)``, timed after K un-timed steps
  have filled its window (before that it runs plain MeZO steps)
* ``zo_fx_hizoo`` (3), ``zo_fx_zoadam`` (2), ``zo_fx_zosgd_momentum`` (2), ``zo_fx_es`` (2 * (N // 2)):
  the other estimators of the registry at their defaults (Gaussian directions; ES with N // 2
  antithetic pairs)
* ``reference_fzoo`` (N+1), ``reference_mezo`` (2): the algorithms as the reference code runs them
  (``reference.py``)
* ``adam`` (1): an AdamW backprop step, forward+backward counted as one pass
* ``floor`` (N+1): one no-grad forward over (N+1)*B examples (the batch repeated);
  ``floor_per_copy`` (N+1): N+1 no-grad forwards over B examples. ``floor`` in --methods runs both.

Step time: median over ``--repeats`` timed steps after ``--warmup`` un-timed ones, with min and max.
``zo_compile`` is not part of a step; its time is ``compile_s``. The ratio table uses the faster of
the two floors as "floor" and names it.

PEFT adapters (``--peft``, one or more of lora, dora, ia3, loha) run the methods on adapters instead
of the full model, side by side:

    python benchmarks/step.py --model smollm2 --peft lora dora ia3 loha --methods zo_fx_fzoo

Each adapter wraps q_proj and v_proj of a fresh copy of the model (``peft.get_peft_model``; rank 8,
alpha 16 where the adapter has them, MeZO's LoRA setting; the adapters keep their initialisation).
Every method in ``--methods`` (default ``zo_fx_fzoo``) and both floors run on the wrapped model with
the mechanics above; zo_fx methods also record the first two lines of ``zm.report()``. A step that
fails (an adapter that ``zo_compile`` cannot handle yet) puts its error in its row of the table and
in the JSON (``adapters.<name>.errors``), and the run goes on with the rest.

Peak memory is measured in one more, un-timed step, so that instrumentation cannot distort timing:

* CUDA: ``torch.cuda.max_memory_allocated()`` after a reset (the master weights stay on the CPU, so
  only this method's copy and what it allocates count).
* CPU: bytes of every live CPU tensor storage when the step starts (found through ``gc``; the master
  copy of the weights and whatever the process held before the benchmark began excluded), plus the
  peak of the running sum of CPU allocator events recorded
  by ``torch.profiler`` (``profile_memory=True``) during the step. The allocator sees every
  ``c10`` allocation, including buffers inside ``torch.compile``-d kernels, which a
  ``TorchDispatchMode`` would miss (and under such a mode compiled code falls back to eager ops, so
  the mode would measure a different program). Frees of storages that existed before the step are
  invisible to the profiler, so a method that replaces tensors out of place would be over-counted;
  ``peak_mem_preexisting_freed_bytes`` reports how many such bytes died during the step (0 for
  in-place methods). Memory that libraries allocate outside ``c10`` (oneDNN scratch) is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd import DeviceType
from tqdm import tqdm

# benchmarks/ is a folder of scripts, not a package: make the sibling module importable both when
# run as a script and when a test loads this file by path.
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from reference import adam_step, floor_forward, reference_fzoo_step, reference_mezo_step  # noqa: E402

from zo_fx.finetune.model import LORA_ALPHA, LORA_RANK  # noqa: E402
from zo_fx.models import load_model, synthetic_batch  # noqa: E402

ZO_FX_METHODS = ("zo_fx_fzoo", "zo_fx_fzoo_lowrank1", "zo_fx_fzoo_lowrank4", "zo_fx_mezo", "zo_fx_adamezo",
                 "zo_fx_hizoo", "zo_fx_zoadam", "zo_fx_zosgd_momentum", "zo_fx_es")
METHODS = (*ZO_FX_METHODS, "reference_fzoo", "reference_mezo", "adam", "floor", "floor_per_copy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOORS = ("floor", "floor_per_copy")
# --peft adapters: the peft module -> the adapter's config (peft is imported only under --peft). Rank and
# alpha are MeZO's LoRA setting, as zo-fx finetune --peft lora uses.
PEFT_TARGETS = ["q_proj", "v_proj"]
_LORA = dict(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS, task_type="CAUSAL_LM")
PEFT_ADAPTERS: dict[str, Callable] = {
    "lora": lambda peft: peft.LoraConfig(**_LORA),
    "dora": lambda peft: peft.LoraConfig(**_LORA, use_dora=True),
    "ia3": lambda peft: peft.IA3Config(target_modules=PEFT_TARGETS, feedforward_modules=[], task_type="CAUSAL_LM"),
    "loha": lambda peft: peft.LoHaConfig(
        r=LORA_RANK, alpha=LORA_ALPHA, target_modules=PEFT_TARGETS, task_type="CAUSAL_LM"
    ),
}
CUDA_MEASURE = "cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats, one extra un-timed step"
CPU_MEASURE = (
    "cpu: live tensor storage bytes at step start (gc scan, master weights excluded) + peak running sum of "
    "c10 CPU allocator events (torch.profiler profile_memory=True) during one extra un-timed step"
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 | opt-125m | opt-1.3b | llama-1b | tiny-llama | tiny-opt | tiny-gpt2 | local folder",
    )
    ap.add_argument("--batch-size", type=int, default=16, help="examples per step, B")
    ap.add_argument("--seq-len", type=int, default=24, help="tokens per example, T")
    ap.add_argument("--directions", type=int, default=8, help="FZOO directions N (FZOO evaluates N+1 groups)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weight dtype")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the steps run")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="un-timed steps per method before timing")
    ap.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {', '.join(METHODS)}; 'floor' runs both floors (default: all but "
        "floor_per_copy; with --peft: zo_fx_fzoo, and both floors always run)",
    )
    ap.add_argument(
        "--peft",
        nargs="+",
        choices=tuple(PEFT_ADAPTERS),
        default=None,
        metavar="ADAPTER",
        help=f"run the methods on these PEFT adapters of the model instead, side by side ({', '.join(PEFT_ADAPTERS)})",
    )
    ap.add_argument("--lr", type=float, default=1e-6, help="learning rate (small: the weights barely move)")
    ap.add_argument("--eps", type=float, default=1e-3, help="perturbation scale of the ZO methods")
    ap.add_argument(
        "--adamezo-horizon",
        type=int,
        default=10,
        help="AdaMeZO window K; K un-timed steps fill it so the timed steps are adaptive ones",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default). On a CPU shared with other busy processes use 1: "
        "OpenMP threads that wait at barriers for a descheduled sibling can make small ops 100x slower",
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="run the methods over model sizes and batch shapes instead (step_sweep.py; default methods "
        "zo_fx_fzoo, zo_fx_mezo, reference_mezo and both floors)",
    )
    ap.add_argument("--sweep-models", nargs="+", default=None, metavar="MODEL",
                    help="models of --sweep (default: smollm2 llama-1b)")
    ap.add_argument("--sweep-shapes", nargs="+", default=None, metavar="BxT",
                    help="batch shapes of --sweep for every model, e.g. 4x16 16x64 (default: per model)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--plot", type=Path, default=None, help="bar chart PNG (default: the --json path, .png)")
    args = ap.parse_args(argv)
    if args.peft:
        args.peft = list(dict.fromkeys(args.peft))
        args.methods = _expand_methods((args.methods or "zo_fx_fzoo") + ",floor")
    elif args.sweep:
        from step_sweep import DEFAULT_METHODS

        args.methods = _expand_methods(args.methods or ",".join(DEFAULT_METHODS))
    else:
        args.methods = _expand_methods(args.methods or ",".join(m for m in METHODS if m != "floor_per_copy"))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    if args.plot is None and args.json is not None:
        args.plot = args.json.with_suffix(".png")
    return args


def _expand_methods(spec: str) -> list[str]:
    names = []
    for name in (s.strip() for s in spec.split(",")):
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        for n in FLOORS if name == "floor" else (name,):
            if n not in names:
                names.append(n)
    return names


def _zo_fx_api() -> dict[str, Callable]:
    """zo_fx's public API, or a loud error: a benchmark that silently skips zo_fx measures nothing."""
    try:
        import zo_fx

        return {"zo_compile": zo_fx.zo_compile, "build_optimizer": zo_fx.build_optimizer}
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            "the zo_fx methods need zo_fx.zo_compile and zo_fx.build_optimizer, and importing them failed "
            f"({e}). Fix zo_fx, or run the baselines only: --methods reference_fzoo,reference_mezo,adam,floor"
        ) from e


def forward_passes(name: str, n_directions: int) -> int:
    """Forward passes over B examples per step (adam: forward+backward counted as one)."""
    if name.startswith("zo_fx_fzoo") or name in ("reference_fzoo", "floor", "floor_per_copy"):
        return n_directions + 1
    if name == "zo_fx_es":  # N/2 antithetic pairs
        return 2 * (n_directions // 2)
    if name == "zo_fx_hizoo":  # theta, theta + eps u, theta - eps u
        return 3
    return 1 if name == "adam" else 2


def _build_step(
    name: str, model: torch.nn.Module, batch: dict, args: argparse.Namespace
) -> tuple[Callable, dict]:
    """A zero-argument callable running one step of ``name`` on ``model``, plus set-up facts."""
    n, lr, eps = args.directions, args.lr, args.eps
    if name in ZO_FX_METHODS:
        api = _zo_fx_api()
        t = time.perf_counter()
        zm = api["zo_compile"](model, batch)
        compile_s = time.perf_counter() - t
        method, _, rank = name.removeprefix("zo_fx_").partition("_lowrank")
        extra = {"fzoo": {"n_directions": n}, "mezo": {"kind": "gaussian"},
                 "adamezo": {"horizon": args.adamezo_horizon}, "hizoo": {}, "zoadam": {"kind": "gaussian"},
                 "zosgd_momentum": {"kind": "gaussian"}, "es": {"n_directions": n // 2}}[method]
        if rank:
            extra = {**extra, "kind": "lowrank", "rank": int(rank)}
        opt = api["build_optimizer"](method, zm, lr=lr, eps=eps, seed=0, **extra)
        extra_warmup = args.adamezo_horizon if name == "zo_fx_adamezo" else 0
        return (lambda: opt.step(batch)), {"compile_s": compile_s, "extra_warmup": extra_warmup, "zm": zm}
    facts = {"compile_s": None, "extra_warmup": 0}
    if name == "reference_fzoo":
        return (lambda: reference_fzoo_step(model, batch, eps, lr, n)), facts
    if name == "reference_mezo":
        return (lambda: reference_mezo_step(model, batch, eps, lr)), facts
    if name == "adam":
        model.train()  # dropout is off in every model here; train() only mirrors real fine-tuning
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        return (lambda: adam_step(model, batch, opt)), facts
    mode = "one_batch" if name == "floor" else "per_copy"
    return (lambda: floor_forward(model, batch, n + 1, mode)), facts


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _loss_of(ret) -> float | None:
    """The loss a step returned, when it says (a float, or a mapping / object with a scalar ``loss``)."""
    loss = ret.get("loss") if isinstance(ret, dict) else getattr(ret, "loss", ret)
    try:
        return float(loss)
    except (TypeError, ValueError, RuntimeError):
        return None


def _live_storages(device: str, exclude: set[int]) -> dict[int, torch.UntypedStorage]:
    """Every live tensor storage on ``device`` reachable as a Python tensor, by data pointer."""
    found = {}
    for obj in gc.get_objects():
        try:
            # type(), not isinstance(): isinstance reads __class__, which some module proxies
            # (torch.distributed.reduce_op) answer with a deprecation warning. FakeTensors (kept in
            # exported graphs' node.meta) claim a device and a size but own no memory.
            kind = type(obj)
            if (
                not issubclass(kind, torch.Tensor)
                or issubclass(kind, FakeTensor)
                or obj.device.type != device
            ):
                continue
            st = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
            continue
        ptr = st.data_ptr()
        if st.nbytes() and ptr and ptr not in exclude:
            found[ptr] = st
    return found


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ libraries write there directly, past ``sys.stderr``)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak(step: Callable, exclude: set[int]) -> dict:
    """Peak CPU tensor bytes during one ``step()``: live storages at the start + allocator high-water mark.

    ``exclude`` holds data pointers not to count (the master weights, which no method touches).
    """
    gc.collect()
    before = _live_storages("cpu", exclude)
    baseline = sum(st.nbytes() for st in before.values())
    refs = [(weakref.ref(st), st.nbytes()) for st in before.values()]
    del before
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto logs a line to fd 2 on start and on stop
        prof.start()
    try:
        step()
    finally:
        with _quiet_stderr():
            prof.stop()
    # kineto_results is the profiler's raw event stream (torch.profiler's memory timeline reads it too):
    # "[memory]" events carry signed byte counts, allocation > 0 and free < 0, in time order.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == DeviceType.CPU:
            running += e.nbytes()
            peak = max(peak, running)
    freed = sum(nbytes for ref, nbytes in refs if ref() is None)
    return {
        "peak_mem_bytes": baseline + peak,
        "peak_mem_baseline_bytes": baseline,
        "peak_mem_preexisting_freed_bytes": freed,
    }


def _cuda_peak(step: Callable) -> dict:
    """Peak CUDA allocated bytes during one ``step()`` (everything on the device counts)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return {"peak_mem_bytes": torch.cuda.max_memory_allocated(), "peak_mem_baseline_bytes": baseline}


def _storage_ptrs(model: torch.nn.Module) -> set[int]:
    """Data pointers of a model's parameters and buffers (a master copy, excluded from peak memory)."""
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def _report_head(zm) -> str:
    """The first two lines of ``zm.report()``: its title and summary."""
    return "\n".join(str(zm.report()).splitlines()[:2])


def run_method(
    name: str,
    master: torch.nn.Module,
    batch: dict,
    args: argparse.Namespace,
    exclude: set[int],
    bar: tqdm,
    report: bool = False,
) -> dict:
    """Time ``name`` on a fresh copy of ``master``, then measure its peak memory in one more step.

    With ``report``, a zo_fx method also records the head of ``zm.report()`` (after the measurements).
    """
    _drop_zo_fx_caches()  # what an earlier method (or caller) cached is not this method's memory
    model = copy.deepcopy(master).to(args.device)
    step, facts = _build_step(name, model, batch, args)
    bar.set_description(name)
    for _ in range(facts["extra_warmup"] + args.warmup):
        step()
        bar.update()
    times, cpu_times, ret = [], [], None
    for _ in range(args.repeats):
        _sync(args.device)
        t, c = time.perf_counter(), time.process_time()
        ret = step()
        _sync(args.device)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        bar.update()
        bar.set_postfix(step_s=f"{times[-1]:.3f}")
    memory = _cuda_peak(step) if args.device == "cuda" else _cpu_peak(step, exclude)
    bar.update()
    fwd = forward_passes(name, args.directions)
    med = statistics.median(times)
    result = {
        "step_s": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_s_all": times,
        # CPU seconds of this process, all threads. With --threads 1 they are not inflated when other
        # processes share the cores (wall time is); compare these when the load averages exceed threads.
        "step_cpu_s": statistics.median(cpu_times),
        **memory,
        "forward_passes_per_step": fwd,
        "s_per_forward": med / fwd,
        "compile_s": facts["compile_s"],
        "untimed_warmup_steps": facts["extra_warmup"] + args.warmup,
        "loss": _loss_of(ret),
        "timing": getattr(ret, "timing", None),  # zo_fx: forward and update seconds of the last timed step
    }
    if report and "zm" in facts:
        result["report"] = _report_head(facts["zm"])
    del step, model, facts
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def _drop_zo_fx_caches() -> None:
    if "zo_fx" in sys.modules:
        from zo_fx.kernels import blocked, lowrank

        lowrank.clear_factor_cache()
        blocked.clear_tile_scratch()


def _error(e: BaseException) -> str:
    """An exception as one JSON-friendly string (torch.export errors can run to pages: cut)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 4000 else text[:4000] + " ..."


def _jsonable_config(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else repr(v)))


def run_adapters(
    master: torch.nn.Module, batch: dict, args: argparse.Namespace, exclude: set[int], bar: tqdm
) -> dict[str, dict]:
    """Every method of ``args.methods`` on each ``args.peft`` adapter of a fresh copy of ``master``.

    A failure (wrapping the model, or any one method) is recorded as an error string and the run goes on.
    """
    import peft

    adapters = {}
    for adapter in args.peft:
        entry = adapters[adapter] = {"error": None, "errors": {}, "methods": {}, "floor_reference": None}
        try:
            config = PEFT_ADAPTERS[adapter](peft)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # adapter initialisation: the same for every run
                wrapped = peft.get_peft_model(copy.deepcopy(master), config).eval()
        except Exception as e:  # reported in the adapter's row; the others still run
            entry["error"] = _error(e)
            bar.write(f"{adapter}: {entry['error'].splitlines()[0]}")
            continue
        entry["config"] = _jsonable_config(config)
        entry["trainable_params"] = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        # Both master copies (the base model and its wrapped copy) stay alive and are not counted.
        wrapped_exclude = exclude | _storage_ptrs(wrapped)
        for name in args.methods:
            try:
                entry["methods"][name] = run_method(name, wrapped, batch, args, wrapped_exclude, bar, report=True)
            except Exception as e:  # reported in the method's row; the others still run
                entry["errors"][name] = _error(e)
                bar.write(f"{adapter} {name}: {entry['errors'][name].splitlines()[0]}")
        entry["floor_reference"] = add_ratios(entry["methods"])
        del wrapped
        gc.collect()
    return adapters


def add_ratios(methods: dict[str, dict]) -> str | None:
    """Add a ``ratios`` dict to every method (this / baseline; < 1 is faster or smaller).

    Returns the name of the floor used as reference: the faster of the two that ran.
    """
    floors = [m for m in FLOORS if m in methods]
    floor = min(floors, key=lambda m: methods[m]["step_s"]) if floors else None
    ref_fzoo, ref_mezo, batched = (methods.get(m) for m in ("reference_fzoo", "reference_mezo", "floor"))

    def ratio(a: float, base: dict | None, key: str) -> float | None:
        return a / base[key] if base and base[key] else None

    for r in methods.values():
        r["ratios"] = {
            "floor": floor,
            "step_vs_floor": ratio(r["step_s"], methods.get(floor), "step_s"),
            "step_vs_reference_fzoo": ratio(r["step_s"], ref_fzoo, "step_s"),
            "s_per_forward_vs_reference_mezo": ratio(r["s_per_forward"], ref_mezo, "s_per_forward"),
            "peak_mem_vs_floor": ratio(r["peak_mem_bytes"], methods.get(floor), "peak_mem_bytes"),
            "peak_mem_vs_floor_one_batch": ratio(r["peak_mem_bytes"], batched, "peak_mem_bytes"),
        }
    return floor


_COLUMNS = (
    "method", "step s (min-max)", "step cpu s", "fwd/step", "s/fwd", "vs floor", "vs reference_fzoo",
    "s/fwd vs reference_mezo", "peak MiB", "mem vs floor", "mem vs one-batch floor",
)  # fmt: skip


def _x(v: float | None) -> str:
    """A ratio table cell."""
    return "-" if v is None else f"{v:.2f}x"


def markdown_table(methods: dict[str, dict], floor: str | None) -> str:
    lines = [
        f"ratios are this / baseline (< 1 = faster or smaller); floor = {floor} (the faster floor); "
        "s/fwd = step_s / forward passes per step; cpu s = process CPU time "
        "(robust to a shared CPU at --threads 1)",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for name, r in methods.items():
        q = r["ratios"]
        cells = [
            name,
            f"{r['step_s']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f})",
            f"{r['step_cpu_s']:.3f}",
            str(r["forward_passes_per_step"]),
            f"{r['s_per_forward']:.3f}",
            _x(q["step_vs_floor"]),
            _x(q["step_vs_reference_fzoo"]),
            _x(q["s_per_forward_vs_reference_mezo"]),
            f"{r['peak_mem_bytes'] / 2**20:.1f}",
            _x(q["peak_mem_vs_floor"]),
            _x(q["peak_mem_vs_floor_one_batch"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_PEFT_COLUMNS = (
    "adapter", "method", "trainable", "step s (min-max)", "step cpu s", "floor s", "vs floor", "peak MiB",
    "floor peak MiB", "mem vs floor", "zo_fx report / error",
)  # fmt: skip


def peft_markdown_table(adapters: dict[str, dict], methods: list[str]) -> str:
    """One row per adapter and method (floors only as the reference columns, unless nothing else ran)."""

    def cell(text: str, cut: int = 200) -> str:  # one line of a table: errors (pages, at times) are cut
        first = text.splitlines()[0] if text else ""
        return (first[:cut] + " ..." if len(first) > cut else first).replace("|", "\\|")

    rows = [m for m in methods if m not in FLOORS] or methods
    lines = [
        f"PEFT adapters on {', '.join(PEFT_TARGETS)} of a fresh copy of the model each; ratios are this / the "
        "faster floor of the same wrapped model (< 1 = faster or smaller); trainable = adapter parameters",
        "",
        "| " + " | ".join(_PEFT_COLUMNS) + " |",
        "|" + "---|" * len(_PEFT_COLUMNS),
    ]
    for adapter, a in adapters.items():
        if a["error"] is not None:
            lines.append("| " + " | ".join([adapter, "-", *["-"] * 8, "error: " + cell(a["error"])]) + " |")
            continue
        floor = a["methods"].get(a["floor_reference"])
        for name in rows:
            r = a["methods"].get(name)
            floor_cells = ["-", "-"]
            if floor is not None:
                floor_cells = [f"{floor['step_s']:.3f}", f"{floor['peak_mem_bytes'] / 2**20:.1f}"]
            notes = [f"error: {cell(a['errors'][name])}"] if name in a["errors"] else []
            notes += [f"{f} error: {cell(a['errors'][f])}" for f in FLOORS if f in a["errors"] and f != name]
            if r is None:
                cells = ["-", "-", floor_cells[0], "-", "-", floor_cells[1], "-"]
            else:
                q = r["ratios"]
                cells = [
                    f"{r['step_s']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f})",
                    f"{r['step_cpu_s']:.3f}",
                    floor_cells[0],
                    _x(q["step_vs_floor"]),
                    f"{r['peak_mem_bytes'] / 2**20:.1f}",
                    floor_cells[1],
                    _x(q["peak_mem_vs_floor"]),
                ]
                if "report" in r:
                    notes.insert(0, cell(r["report"].replace("\n", ": ", 1), cut=1000))
            lines.append(
                "| " + " | ".join([adapter, name, f"{a['trainable_params']:,}", *cells, "; ".join(notes) or "-"]) + " |"
            )
    return "\n".join(lines)


def plot(methods: dict[str, dict], settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    med = [methods[n]["step_s"] for n in names]
    err = [
        [m - methods[n]["step_s_min"] for n, m in zip(names, med)],
        [methods[n]["step_s_max"] - m for n, m in zip(names, med)],
    ]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_t.bar(names, med, yerr=err, capsize=3, color="tab:blue")
    ax_t.set_ylabel("step time, s (median, min-max)")
    ax_m.bar(names, [methods[n]["peak_mem_bytes"] / 2**20 for n in names], color="tab:orange")
    ax_m.set_ylabel("peak memory, MiB")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", rotation=40)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle(
        f"{settings['model']}  B={settings['batch_size']} T={settings['seq_len']} "
        f"N={settings['directions']}  {settings['device']} {settings['dtype']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _settings(args: argparse.Namespace, n_params: int, floor: str | None, load_start: float) -> dict:
    # Load averages above the thread count mean other processes shared the CPU: wall times are inflated.
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(
        torch=torch.__version__,
        transformers=transformers.__version__,
        zo_fx=importlib.metadata.version("zo_fx"),
        python=platform.python_version(),
        machine=platform.machine(),
        processor=platform.processor(),
        cuda_device=torch.cuda.get_device_name() if args.device == "cuda" else None,
        model_params=n_params,
        floor_reference=floor,
        load_average_1min_start=load_start,
        load_average_1min_end=os.getloadavg()[0],
        peak_mem_measure=CUDA_MEASURE if args.device == "cuda" else CPU_MEASURE,
        forward_pass_note="adam counts forward+backward as one pass; floors count N+1 passes over B examples",
    )
    return settings


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    load_start = os.getloadavg()[0]
    if any(m in ZO_FX_METHODS for m in args.methods):
        _zo_fx_api()  # fail before spending minutes on the baselines
    if args.sweep:
        from step_sweep import main_sweep

        # what the sweep reuses from this file (loaded by path in the tests, so not always importable by name)
        here = SimpleNamespace(run_method=run_method, add_ratios=add_ratios, DTYPES=DTYPES,
                               _storage_ptrs=_storage_ptrs)
        result = main_sweep(here, args)
        result["settings"].update(load_average_1min_start=load_start, load_average_1min_end=os.getloadavg()[0])
        return result
    # The master copy stays on the CPU: every method gets a deepcopy on --device.
    # what the process held before (a caller's tensors, a test session's leftovers) is no method's memory
    _drop_zo_fx_caches()
    gc.collect()
    held_before = set(_live_storages("cpu", set()))
    master, _ = load_model(args.model, DTYPES[args.dtype])
    exclude = _storage_ptrs(master) | held_before
    batch = {
        k: v.to(args.device)
        for k, v in synthetic_batch(master.config.vocab_size, args.batch_size, args.seq_len).items()
    }
    steps_per = args.warmup + args.repeats + 1
    total = steps_per * len(args.methods) + (args.adamezo_horizon if "zo_fx_adamezo" in args.methods else 0)
    total *= len(args.peft) if args.peft else 1
    methods, adapters = {}, None
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        with tqdm(total=total, unit="step") as bar:
            if args.peft:
                adapters = run_adapters(master, batch, args, exclude, bar)
            else:
                for name in args.methods:
                    methods[name] = run_method(name, master, batch, args, exclude, bar)
        args.threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)  # process-wide: leave a caller (a test session) as it was
    n_params = sum(p.numel() for p in master.parameters())
    if adapters is None:
        floor = add_ratios(methods)
        result = {"settings": _settings(args, n_params, floor, load_start), "methods": methods}
        print(markdown_table(methods, floor))
        plotted = methods
    else:  # each adapter names its own floor (add_ratios ran per adapter)
        result = {"settings": _settings(args, n_params, None, load_start), "adapters": adapters}
        result["settings"]["peft_version"] = importlib.metadata.version("peft")
        print(peft_markdown_table(adapters, args.methods))
        plotted = {f"{adapter} {name}": r for adapter, a in adapters.items() for name, r in a["methods"].items()}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot is not None and plotted:
        plot(plotted, result["settings"], args.plot)
    return result


if __name__ == "__main__":
    main()
