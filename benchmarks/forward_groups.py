"""One batched evaluation of G perturbed copies vs the ways people do it today.

Times, side by side in one run on the same model and batch:

* ``zo_fx``: one ``ZOModule.group_losses`` call with G groups (FZOO's table: l_0 plus
  G-1 Rademacher directions), perturbations generated on the fly, no weight touched;
* ``reference``: G eager forwards, perturbing every weight in place with torch's
  generator before each and restoring after (how the MeZO / FZOO reference code does it);
* ``floor_one_batch``: one plain no-grad forward over the G*B examples;
* ``floor_per_copy``: G plain no-grad forwards over the B examples.

With ``--check`` it also compiles the model, prints ``report()``, and checks the
compiled group losses against the eager model with explicitly perturbed weights.

    python benchmarks/forward_groups.py --model smollm2 --check --json runs/forward_groups.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))

from reference import _add_noise_  # noqa: E402

import zo_fx  # noqa: E402
from zo_fx.models import load_model, synthetic_batch  # noqa: E402


def _median_time(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"s": statistics.median(times), "s_min": min(times), "s_max": max(times)}


def check_against_eager(model, zm, batch, groups: int = 3, eps: float = 1e-3) -> float:
    """Max relative error of compiled group losses vs explicitly perturbed eager forwards."""
    table = zo_fx.GroupTable([11, 11, 0][:groups], [1.0, -1.0, 0.0][:groups], eps, "rademacher")
    compiled = zm.group_losses(batch, table)
    params = dict(model.named_parameters())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = []
    with torch.no_grad():
        for seed, coef in zip(table.seeds, table.coefs):
            direction = zm.direction(seed, table.kind)
            for n, u in direction.items():
                params[n].add_(eps * coef * u)
            ref.append(zo_fx.causal_lm_loss(model(**inputs).logits, batch))
            for n, u in direction.items():
                params[n].sub_(eps * coef * u)
    ref = torch.stack(ref)
    return ((compiled - ref).abs() / ref.abs()).max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=24)
    ap.add_argument("--groups", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="print report() and check against the eager model")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, _ = load_model(args.model)
    model.eval()
    batch = synthetic_batch(model.config.vocab_size, args.batch_size, args.seq_len)
    t = time.perf_counter()
    zm = zo_fx.zo_compile(model, batch)
    compile_s = time.perf_counter() - t
    result = {"settings": {**vars(args), "json": str(args.json), "torch": torch.__version__,
                           "threads": torch.get_num_threads()}, "compile_s": compile_s}
    if args.check:
        t = time.perf_counter()
        report = zm.report(groups=3)
        result["rewrite_s"] = time.perf_counter() - t
        print(report)
        result["report_summary"] = report.summary()
        result["all_covered"] = report.all_covered
        result["check_rel_err_g3_float32"] = check_against_eager(model, zm, batch)
        print(f"compile {compile_s:.1f} s, rewrite {result['rewrite_s']:.1f} s; G=3 float32 max relative error "
              f"vs eager with explicitly perturbed weights: {result['check_rel_err_g3_float32']:.2e}")

    g = args.groups
    table = zo_fx.GroupTable([0] + list(range(1, g)), [0.0] + [1.0] * (g - 1), 1e-3, "rademacher")
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    big = {k: torch.cat([v] * g) for k, v in inputs.items()}

    def zo_fx_groups():
        zm.group_losses(batch, table)

    @torch.no_grad()
    def reference():
        model(**inputs)
        for seed in range(1, g):
            _add_noise_(params, seed, 1e-3, "rademacher")
            model(**inputs)
            _add_noise_(params, seed, -1e-3, "rademacher")

    @torch.no_grad()
    def floor_one_batch():
        model(**big)

    @torch.no_grad()
    def floor_per_copy():
        for _ in range(g):
            model(**inputs)

    methods = {"zo_fx": zo_fx_groups, "reference": reference, "floor_one_batch": floor_one_batch,
               "floor_per_copy": floor_per_copy}
    times = {name: _median_time(fn, args.repeats) for name, fn in tqdm(methods.items(), desc="timing")}
    floor = min(times["floor_one_batch"]["s"], times["floor_per_copy"]["s"])
    result["methods"] = times
    result["ratios"] = {
        "zo_fx_vs_floor": times["zo_fx"]["s"] / floor,
        "zo_fx_vs_floor_one_batch": times["zo_fx"]["s"] / times["floor_one_batch"]["s"],
        "zo_fx_vs_floor_per_copy": times["zo_fx"]["s"] / times["floor_per_copy"]["s"],
        "reference_vs_zo_fx": times["reference"]["s"] / times["zo_fx"]["s"],
    }
    print(f"\nG={g}, B={args.batch_size}, T={args.seq_len}, {args.model}")
    print("| method | median s | min | max | vs floor |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t['s']:.3f} | {t['s_min']:.3f} | {t['s_max']:.3f} | {t['s'] / floor:.2f}x |")
    print(f"zo_fx is {result['ratios']['reference_vs_zo_fx']:.2f}x faster than the in-place reference; "
          f"{result['ratios']['zo_fx_vs_floor']:.2f}x the floor (target <= 1.5x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
