"""Throughput of the direction streams on this machine (torch path).

Times generating 135M elements (SmolLM2-135M's size) of Rademacher signs and of
Gaussian values, eagerly (``directions.sample``, chunked) and through the fused,
compiled pass (``generate.perturbed``, which also adds them to a weight), and writes a
JSON with elements per second.

    python benchmarks/directions.py --numel 135000000 --json runs/directions.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=135_000_000)
    ap.add_argument("--chunk", type=int, default=1 << 22)
    ap.add_argument("--layer", type=int, default=576 * 1536, help="weight size for the fused pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

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
