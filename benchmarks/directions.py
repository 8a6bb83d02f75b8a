"""Throughput of the direction streams on this machine (torch path).

Times generating 135M elements (SmolLM2-135M's size) of Rademacher signs and of
Gaussian values, eagerly (``directions.sample``, chunked) and through the fused,
compiled pass (``generate.perturbed``, which also adds them to a weight), and writes a
JSON with elements per second.

    python benchmarks/directions.py --numel 135000000 --json runs/directions.json

``--native`` instead compares the native CPU kernel (zo_fx/kernels/native) with the torch path
side by side, at 1 thread and at all cores, and prints a markdown report with the CPU model and
the tile budget picked from its caches:

* perturbed-tile formation (``blocked._perturbed_tiles``: G perturbed copies of one weight tile),
  Rademacher and Gaussian, in G elements written per second per core, for a tile whose G outputs
  fit the L2 and one that fits the L3; the native kernel writes into a reused buffer (as the
  blocked GEMM does), the torch function allocates its result (as it does in the GEMM);
* the fused update (K directions, one pass over a weight far larger than the caches) against a
  memcpy of the same weight (``Tensor.copy_``) and the torch reference update;
* an in-cache ``torch.add`` of two 2**18-element float32 tensors, the machine's yardstick.

    python benchmarks/directions.py --native --json runs/directions_native.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from zo_fx.kernels import blocked, native, update
from zo_fx.kernels import perturb as G
from zo_fx.streams import layout as D


def _time(fn, repeats):
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def _best(fn, repeats: int, min_seconds: float = 0.1) -> float:
    """Fastest of ``repeats`` timings, each averaging enough calls to last ``min_seconds`` (shared
    machines are noisy: the minimum is the least disturbed run)."""
    fn()
    t = time.perf_counter()
    fn()
    calls = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def cpu_model() -> str:
    """The CPU's model name, for every benchmark's output (lscpu, then /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _tile_case(n: int, groups: int, kind: str, dtype):
    base = torch.randn(n).to(dtype)
    seeds = list(range(1, groups + 1))
    lo, hi, pid, tag = D.key_tensors(seeds, 3, kind)
    which = torch.arange(groups)
    scales = torch.full((groups,), 1e-3, dtype=torch.float64)
    return base, (scales, which, torch.tensor(0), lo, hi, pid, tag, kind)


def native_report(args) -> dict:
    """Native kernel vs torch path, side by side, at 1 thread and at all cores."""
    from zo_fx.kernels._chunks import _compiled

    all_cores = os.cpu_count() or 1
    info = native.info()
    rows = []
    for threads in sorted({1, all_cores}):
        torch.set_num_threads(threads)
        os.environ["ZO_FX_NATIVE_THREADS"] = str(threads)
        x, y = torch.randn(1 << 18), torch.randn(1 << 18)
        o = torch.empty(1 << 18)
        add = (1 << 18) / _best(lambda: torch.add(x, y, out=o), args.repeats) / 1e9
        rows.append({"threads": threads, "case": "in-cache torch.add, 2**18 float32", "native": None, "torch": add,
                     "unit": "G el/s"})
        g = args.groups
        for kind in D.KINDS:
            for n, where in ((args.l2_tile, "L2"), (args.l3_tile, "L3")):
                base, targs = _tile_case(n, g, kind, torch.float32)
                buf = torch.empty(g, n)
                t_nat = _best(lambda: native.perturbed_tiles(base, *targs, buf), args.repeats)
                t_eager = _best(lambda: blocked._perturbed_tiles_torch(base, *targs), args.repeats)
                row = {"threads": threads, "case": f"{kind} tiles, G={g} x {n} float32 ({where})",
                       "native": g * n / t_nat / 1e9, "torch": g * n / t_eager / 1e9, "unit": "G el/s"}
                if args.torch_compiled:
                    fn = _compiled(blocked._perturbed_tiles_torch)
                    row["torch_compiled"] = g * n / _best(lambda: fn(base, *targs), args.repeats) / 1e9
                rows.append(row)
        p = torch.randn(args.update_numel)
        q = torch.empty_like(p)
        t_copy = _best(lambda: q.copy_(p), args.repeats)
        for kind in D.KINDS:
            k = args.update_directions
            seeds, coefs = list(range(k)), [1e-3] * k
            t_nat = _best(lambda: update.fused_update_reference_(p, seeds, coefs, 5, kind, 1e-9), args.repeats)
            os.environ["ZO_FX_NATIVE"] = "0"
            try:
                t_torch = _best(lambda: update.fused_update_reference_(p, seeds, coefs, 5, kind, 1e-9), 1)
            finally:
                os.environ.pop("ZO_FX_NATIVE")
            rows.append({"threads": threads, "case": f"{kind} update, K={k}, {args.update_numel} float32",
                         "native": args.update_numel / t_nat / 1e9, "torch": args.update_numel / t_torch / 1e9,
                         "memcpy": args.update_numel / t_copy / 1e9, "unit": "G el/s",
                         "native_vs_memcpy": t_copy / t_nat})
        for r in rows:
            if r["threads"] == threads:
                print("measured:", json.dumps(r), flush=True)
    torch.set_num_threads(all_cores)
    os.environ.pop("ZO_FX_NATIVE_THREADS", None)
    lines = [f"CPU: {cpu_model()} ({all_cores} cores), torch {torch.__version__}",
             f"native: {'loaded' if info['loaded'] else 'NOT loaded'} ({info.get('flags', info.get('error', ''))})",
             blocked.describe_tiles(), "",
             "| threads | case | native (per core) | torch (per core) | native / torch | notes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["threads"]
        nat = "-" if r["native"] is None else f"{r['native'] / t:.2f}"
        ratio = "-" if r["native"] is None else f"{r['native'] / r['torch']:.1f}x"
        notes = []
        if "torch_compiled" in r:
            notes.append(f"torch compiled {r['torch_compiled'] / t:.2f}")
        if "memcpy" in r:
            notes.append(f"memcpy {r['memcpy'] / t:.2f}; native = {100 * r['native_vs_memcpy']:.0f}% of memcpy")
        lines.append(f"| {t} | {r['case']} | {nat} | {r['torch'] / t:.2f} | {ratio} | {'; '.join(notes)} |")
    lines.append("")
    lines.append("G el/s per core: elements written (tiles: G x n) or updated per second, divided by the threads.")
    print("\n".join(lines))
    return {"cpu": cpu_model(), "cores": all_cores, "native": info, "tiles": blocked.tile_budget(), "rows": rows,
            "report": "\n".join(lines)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=135_000_000)
    ap.add_argument("--chunk", type=int, default=1 << 22)
    ap.add_argument("--layer", type=int, default=576 * 1536, help="weight size for the fused pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--native", action="store_true", help="native kernel vs torch path, side by side (see above)")
    ap.add_argument("--groups", type=int, default=8, help="--native: perturbed groups per tile (FZOO's 8)")
    ap.add_argument("--l2-tile", type=int, default=1 << 14, help="--native: tile elements whose G copies fit L2")
    ap.add_argument("--l3-tile", type=int, default=1 << 18, help="--native: tile elements whose G copies fit L3")
    ap.add_argument("--update-numel", type=int, default=1 << 24, help="--native: weight size of the update")
    ap.add_argument("--update-directions", type=int, default=8, help="--native: directions K of the update")
    ap.add_argument("--torch-compiled", action="store_true", help="--native: also time the compiled torch tiles")
    args = ap.parse_args(argv)
    if args.native:
        out = native_report(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"settings": {**vars(args), "json": str(args.json)}, **out}, indent=2,
                                            default=str))
        return

    def eager(kind):
        def run():
            for s in range(0, args.numel, args.chunk):
                D.sample(1, 2, s, min(args.chunk, args.numel - s), kind)

        return run

    n_layers = max(1, args.numel // args.layer)
    weights = [torch.randn(args.layer) for _ in range(min(n_layers, 16))]

    def fused(kind):
        def run():
            for i in range(n_layers):
                G.perturbed(weights[i % len(weights)], 1, i, 1e-3, kind)

        return run

    results = {}
    cases = [(f"{mode}_{kind}", fn(kind)) for kind in D.KINDS for mode, fn in (("eager", eager), ("fused", fused))]
    for name, fn in tqdm(cases, desc="directions"):
        med, lo, hi = _time(fn, args.repeats)
        numel = args.numel if name.startswith("eager") else n_layers * args.layer
        results[name] = {"seconds": med, "seconds_min": lo, "seconds_max": hi, "elements": numel,
                         "elements_per_s": numel / med}
    print(f"| path | seconds for {args.numel/1e6:.0f}M elements | G elements/s |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds'] * args.numel / r['elements']:.3f} | {r['elements_per_s']/1e9:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {**vars(args), "json": str(args.json), "torch": torch.__version__,
                    "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2))


if __name__ == "__main__":
    main()
