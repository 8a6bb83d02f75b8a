"""Where a step's time goes: one zo_fx step and the floor under ``torch.profiler``, by category.

    python benchmarks/step_profile.py --model smollm2 --batch-size 16 --seq-len 24 --threads 2 \\
        --json benchmarks/results/step_profile_smollm2.json

Self CPU time of every op is put in one category (GEMM, direction generation, attention,
softmax and loss, elementwise, memory, other) for a FZOO step (or ``--method mezo``) and for
the faster floor's forwards over the same examples. The profiler adds overhead to small ops,
so the totals run above the step times of ``step.py``; read the shares, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import profile

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from reference import floor_forward  # noqa: E402

import zo_fx  # noqa: E402
from zo_fx.models import load_model, synthetic_batch  # noqa: E402

CATEGORIES = {
    "GEMM": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::softmax", "aten::_softmax"),
    "softmax + loss": ("aten::_log_softmax", "aten::nll_loss", "aten::cross_entropy", "aten::log_softmax"),
    "direction generation": ("CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo", "Pregraph",
                             "AOTDispatcher", "aten::bitwise", "aten::__rshift__", "aten::__lshift__",
                             "aten::remainder", "aten::floor_divide", "aten::_unique", "aten::sort"),
    "memory (copy, cat, alloc)": ("aten::copy_", "aten::cat", "aten::empty", "aten::clone", "aten::contiguous",
                                  "aten::index", "aten::gather", "aten::repeat"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::silu", "aten::gelu", "aten::pow", "aten::rsqrt",
                    "aten::mean", "aten::neg", "aten::div", "aten::where", "aten::exp", "aten::tanh", "aten::relu"),
}


def category(op: str) -> str:
    for name, prefixes in CATEGORIES.items():
        if any(op.startswith(p) or p in op for p in prefixes):
            return name
    return "other"


def profile_step(step, top: int = 0) -> dict[str, float]:
    step()  # warm: compiled kernels built, allocator primed
    with profile() as prof:
        step()
    if top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        c = category(event.key)
        shares[c] = shares.get(c, 0.0) + event.self_cpu_time_total / 1e6
    return shares


def table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    cats = list(CATEGORIES) + ["other"]
    lines = ["| category | " + " | ".join(f"{n} s (share)" for n in names) + " |", "|---" * (1 + len(names)) + "|"]
    totals = {n: sum(results[n].values()) for n in names}
    for c in cats:
        cells = [f"{results[n].get(c, 0.0):.2f} ({results[n].get(c, 0.0) / totals[n]:.0%})" for n in names]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| total (profiled) | " + " | ".join(f"{totals[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """The model, batch shape, FZOO directions and threads of a one-step benchmark (this one, step_tiles.py)."""
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=24)
    ap.add_argument("--directions", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def compiled_model(args: argparse.Namespace):
    """``(model, zm, batch)``: the model of ``args``, compiled for a synthetic batch of its shape, and the batch."""
    model, _ = load_model(args.model)
    batch = synthetic_batch(model.config.vocab_size, args.batch_size, args.seq_len)
    return model, zo_fx.zo_compile(model, batch), batch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap)
    ap.add_argument("--method", choices=("fzoo", "mezo"), default="fzoo")
    ap.add_argument("--kind", default=None, help="direction kind (default: the method's; e.g. lowrank:1)")
    ap.add_argument("--top", type=int, default=0, help="also list the N ops with the most self CPU time of the step")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # process-wide: leave a caller (a test session) as it was


def _run(args: argparse.Namespace) -> dict:
    model, zm, batch = compiled_model(args)
    extra = {"n_directions": args.directions} if args.method == "fzoo" else {"kind": "gaussian"}
    if args.kind:
        extra["kind"] = args.kind
    opt = zo_fx.build_optimizer(args.method, zm, lr=0.0, eps=1e-3, seed=0, **extra)
    copies = args.directions + 1 if args.method == "fzoo" else 2
    with torch.no_grad():
        results = {
            f"zo_fx {args.method}" + (f" {opt.kind}" if args.kind else ""): profile_step(lambda: opt.step(batch),
                                                                                         args.top),
            "floor (per copy)": profile_step(lambda: floor_forward(model, batch, copies, "per_copy")),
            "floor (one batch)": profile_step(lambda: floor_forward(model, batch, copies, "one_batch")),
        }
    text = table(results)
    print(text)
    out = {"settings": {k: str(v) for k, v in vars(args).items()} | {"threads_used": torch.get_num_threads()},
           "seconds": results}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        args.json.with_suffix(".md").write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
