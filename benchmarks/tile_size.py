"""How large a tile the cache-blocked grouped GEMM should take: the measurement behind its budget.

``zo_fx.kernels.blocked`` walks each weight in tiles and forms every perturbed group's tile
in cache before its GEMM. Small tiles pay a call per tile and a narrow GEMM; large ones push
the G perturbed tiles out of the last-level cache. This times
``blocked_grouped_matmul`` over tile sizes for the weight shapes of SmolLM2-135M and a
1.2B Llama, FZOO's 8 perturbed groups (plus the plain one) and MeZO's 2 groups sharing one
seed, and a plain ``x @ W^T`` over all the groups' rows for scale:

    python benchmarks/tile_size.py --threads 2 --json benchmarks/results/tile_size.json

Each cell is the median of ``--repeats`` calls, in ms; the table marks the fastest tile per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from forward_groups import _median_time  # noqa: E402

from zo_fx.kernels import blocked  # noqa: E402

SHAPES = {  # weight [N, K] (out_in) and the rows per group of a typical step
    "smollm2 q/o 576x576": (576, 576, 384),
    "smollm2 up 1536x576": (1536, 576, 384),
    "smollm2 down 576x1536": (576, 1536, 384),
    "1.2B q 2048x2048": (2048, 2048, 64),
    "1.2B up 8192x2048": (8192, 2048, 64),
    "1.2B down 2048x8192": (2048, 8192, 64),
}
TILES = [1 << k for k in range(15, 22)]


def _time(fn, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up (forward_groups.py's timer)."""
    return _median_time(fn, repeats)["s"] * 1e3


def measure(repeats: int) -> list[dict]:
    rows = []
    for label, (n, k, r) in SHAPES.items():
        weight = torch.randn(n, k) * 0.02
        for method, seeds, scales in (
            ("fzoo G=9", list(range(9)), [0.0] + [1e-3] * 8),
            ("mezo G=2", [5, 5], [1e-3, -1e-3]),
        ):
            x = torch.randn(len(seeds), r, k)
            row = {"shape": label, "method": method, "rows_per_group": r,
                   "plain_ms": _time(lambda: x.reshape(-1, k) @ weight.t(), repeats), "tiles_ms": {}}
            for tile in TILES:
                row["tiles_ms"][tile] = _time(
                    lambda: blocked.blocked_grouped_matmul(x, weight, 1, seeds, scales, "rademacher", "out_in",
                                                           shared_input=False, tile=tile),
                    repeats,
                )
            print(table([row], header=not rows), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines += ["| weight | groups | rows/group | plain ms | " + " | ".join(f"2^{t.bit_length() - 1}" for t in TILES)
                  + " |", "|---" * (4 + len(TILES)) + "|"]
    for row in rows:
        best = min(row["tiles_ms"], key=row["tiles_ms"].get)
        cells = [f"**{v:.1f}**" if t == best else f"{v:.1f}" for t, v in row["tiles_ms"].items()]
        lines.append(f"| {row['shape']} | {row['method']} | {row['rows_per_group']} | {row['plain_ms']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.repeats)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                         "rows": rows}, indent=2))
        args.json.with_suffix(".md").write_text(table(rows) + "\n")
    return rows


if __name__ == "__main__":
    main()
