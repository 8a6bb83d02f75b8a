"""How fast the native perturbed tiles run inside a real FZOO step, by tile shape.

Isolated, the tile kernel is compute-bound on Philox; inside a step it shares the caches and the
cores with the GEMMs between its calls. This wraps ``zo_fx.kernels.native.perturbed_tiles`` with a
timer for one step (after a warm-up step) and prints, per (tile elements, groups, buffer reused),
the calls, the seconds and the elements per second, beside the step's time:

    python benchmarks/step_tiles.py --model llama-1b --batch-size 4 --seq-len 16 --threads 2

``ZO_FX_TILE_BYTES`` changes the tile budget (``zo_fx.kernels.blocked.tile_budget``).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from directions import cpu_model  # benchmarks/ is on sys.path when this runs as a script
from step_profile import add_step_arguments, compiled_model

import zo_fx
from zo_fx.kernels import blocked, native


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"the native kernel is not built here: {native.info()}")
    _, zm, batch = compiled_model(args)
    opt = zo_fx.build_optimizer("fzoo", zm, lr=1e-6, eps=1e-3, seed=0, n_directions=args.directions)
    stats: dict = collections.defaultdict(lambda: [0, 0.0, 0])
    original = native.perturbed_tiles

    def timed(base, scales, which, *rest, **kwargs):
        t = time.perf_counter()
        out = original(base, scales, which, *rest, **kwargs)
        entry = stats[(base.numel(), which.numel(), kwargs.get("out", rest[6] if len(rest) > 6 else None) is not None)]
        entry[0] += 1
        entry[1] += time.perf_counter() - t
        entry[2] += base.numel() * which.numel()
        return out

    native.perturbed_tiles = timed
    try:
        with torch.no_grad():
            opt.step(batch)  # warm-up
            stats.clear()
            t = time.perf_counter()
            opt.step(batch)
            step_s = time.perf_counter() - t
    finally:
        native.perturbed_tiles = original
    tiles_s = sum(v[1] for v in stats.values())
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; {blocked.describe_tiles()}")
    print(f"{args.model} B={args.batch_size} T={args.seq_len} N={args.directions}: step {step_s:.2f} s, "
          f"perturbed tiles {tiles_s:.2f} s ({tiles_s / step_s:.0%})")
    print("| tile elements | groups | buffer reused | calls | seconds | G elements/s |\n|---|---|---|---|---|---|")
    for (n, groups, reused), (calls, seconds, elements) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"| {n} | {groups} | {reused} | {calls} | {seconds:.2f} | {elements / seconds / 1e9:.2f} |")
    return {"step_s": step_s, "tiles_s": tiles_s}


if __name__ == "__main__":
    main()
