"""Microbenchmark: grouped_linear (G perturbed GEMMs, one weight read) against torch's plain linear.

The baseline is what the perturbation costs on top of: one cuBLAS GEMM over all G*M rows
with the unperturbed weight (``F.linear(x.view(G*M, K), W)``). The materialising torch
reference (one ``W + s U`` per group, then G GEMMs) is timed beside them. Shapes are
OPT-125M (d=768, ffn=3072) and OPT-1.3B (d=2048, ffn=8192) projections, bf16.

Run by ``benchmarks/gpu_kernels.sh``; writes one JSON file.

    python benchmarks/gpu_bench_linear.py --out runs/gpu_bench_linear.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from zo_fx.kernels.linear import grouped_linear

# (model, layer, N, K): weight [N, K] as nn.Linear stores it
SHAPES = [
    ("opt-125m", "q_proj", 768, 768),
    ("opt-125m", "fc1", 3072, 768),
    ("opt-1.3b", "q_proj", 2048, 2048),
    ("opt-1.3b", "fc1", 8192, 2048),
    ("opt-1.3b", "fc2", 2048, 8192),
]


def bench_one(n: int, k: int, groups: int, rows: int, kind: str, with_reference: bool) -> dict:
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(groups, rows, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
    b = torch.randn(n, device=dev, dtype=dt)
    seeds = list(range(1, groups + 1))
    scales = [1e-3 * (-1) ** g for g in range(groups)]

    def kernel():
        return grouped_linear(x, w, b, 1, 2, seeds, scales, kind, shared_input=False, impl="triton")

    def plain():
        return F.linear(x.view(groups * rows, k), w, b)

    def reference():
        return grouped_linear(x, w, b, 1, 2, seeds, scales, kind, shared_input=False, impl="torch")

    t0 = time.perf_counter()
    kernel()  # autotunes on first call
    torch.cuda.synchronize()
    tune_s = time.perf_counter() - t0
    ms_kernel = do_bench(kernel)
    ms_plain = do_bench(plain)
    flops = 2.0 * groups * rows * n * k
    rec = {
        "n": n,
        "k": k,
        "groups": groups,
        "rows_per_group": rows,
        "kind": kind,
        "ms_grouped_linear": ms_kernel,
        "ms_plain_linear": ms_plain,
        "overhead_vs_plain": ms_kernel / ms_plain,
        "tflops_grouped_linear": flops / ms_kernel / 1e9,
        "tflops_plain_linear": flops / ms_plain / 1e9,
        "first_call_s": tune_s,
        "best_config": str(getattr(_kernel_obj(), "best_config", None)),
    }
    if with_reference:
        rec["ms_torch_reference"] = do_bench(reference)
    return rec


def _kernel_obj():
    from zo_fx.kernels import linear

    return linear._grouped_linear_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--rows", type=int, default=2048, help="rows per group (batch x sequence)")
    parser.add_argument("--quick", action="store_true", help="first two shapes only")
    args = parser.parse_args()

    records = []
    shapes = SHAPES[:2] if args.quick else SHAPES
    for model, layer, n, k in shapes:
        for groups, kind in ((2, "rademacher"), (2, "gaussian"), (4, "rademacher")):
            try:
                rec = bench_one(
                    n, k, groups, args.rows, kind, with_reference=groups == 2 and kind == "rademacher"
                )
            except Exception as exc:  # record and go on: one failing shape should not lose the others
                rec = {"n": n, "k": k, "groups": groups, "kind": kind, "error": repr(exc)}
            rec.update(model=model, layer=layer)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "records": records,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
