"""Batched perturbed generation against plain batched ``generate`` and the peers' perturb/generate/restore loop.

Side by side in one run, on SmolLM2-135M-Instruct (float32) and Countdown prompts:

* **zo_fx**: ``zm.generate`` of G perturbed models (FZOO's table: the unperturbed model and
  N = G - 1 directions, full-rank Rademacher) on B prompts, one batched decode with a KV cache
  per group;
* **zo_fx_lowrank{r}**: the same with low-rank directions of rank r (``--ranks``): each decode
  step shares one GEMM per linear across the groups and adds two rank-r GEMMs per group;
* **floor**: plain ``model.generate`` of the unperturbed model on the same G x B prompts in one
  batch (what the same tokens cost with no perturbation at all);
* **peers**: the ES-at-scale / eggroll-es way in PyTorch: for each member, add Gaussian noise to
  every weight in place (torch's generator), ``model.generate`` on the B prompts, subtract the
  regenerated noise.

Every sequence decodes exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``),
greedily, so all three produce G x B x new tokens. Times are medians of ``--repeats`` runs after
one warm-up (zo_fx's warm-up captures and rewrites its decoding graphs). Peak memory: live tensor
bytes plus the CPU allocator's high-water mark over one more, un-timed run of ``--memory-tokens``
new tokens (``step.py``'s measure). The CPU model and thread count are printed with the result.

    python benchmarks/generate.py --threads 2            # writes benchmarks/results/generate_smollm2.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from directions import cpu_model  # noqa: E402
from step import _cpu_peak  # noqa: E402

import zo_fx  # noqa: E402
from zo_fx.models import load_smollm2  # noqa: E402
from zo_fx.optim.base import direction_seed  # noqa: E402
from zo_fx.tasks.countdown import countdown_task  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peers_generate(model, batch: dict, members: int, eps: float, new_tokens: int) -> None:
    """Each member: perturb in place with torch's generator, generate, restore (as the ES peers do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for member in range(members):
        if member:
            gen = torch.Generator().manual_seed(member)
            for p in params:
                p.data.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=eps)
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if member:
            gen = torch.Generator().manual_seed(member)
            for p in params:
                p.data.sub_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=8, help="G perturbed models (FZOO: N = G - 1)")
    parser.add_argument("--prompts", type=int, default=4, help="B prompts")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-tokens", type=int, default=8, help=(
        "new tokens of the run whose peak memory is measured (the profiler's event log of a long low-rank "
        "decode outgrows a 24 GB machine; the peak is the prefill's plus the cache, nearly the same)"))
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 4], help="low-rank directions to time beside")
    parser.add_argument("--out", default=str(HERE / "results" / "generate_smollm2"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2(torch.float32)
    model.config.use_cache = True
    tokenizer.padding_side = "left"
    prompts = [e["prompt"] for e in countdown_task(0, sizes={"train": args.prompts, "validation": 0,
                                                             "test": 0}).train]
    batch = dict(tokenizer(prompts, return_tensors="pt", padding=True))
    many = {k: v.repeat(args.groups, 1) for k, v in batch.items()}
    zm = zo_fx.zo_compile(model, batch)
    eps, n = 1e-3, args.new_tokens
    table = zo_fx.GroupTable([0] + [direction_seed(0, 0, i) for i in range(args.groups - 1)],
                             [0.0] + [1.0] * (args.groups - 1), eps)

    def lowrank(rank: int, n: int):
        low = zo_fx.GroupTable(table.seeds, table.coefs, eps, "lowrank", rank=rank)
        return lambda: zm.generate(batch, low, n, min_new_tokens=n)

    def ways(n: int) -> dict:
        return {
            "zo_fx": lambda: zm.generate(batch, table, n, min_new_tokens=n),
            **{f"zo_fx_lowrank{r}": lowrank(r, n) for r in args.ranks},
            "floor": lambda: model.generate(**many, max_new_tokens=n, min_new_tokens=n, do_sample=False),
            "peers": lambda: peers_generate(model, batch, args.groups, eps, n),
        }

    runs, short = ways(n), ways(args.memory_tokens)
    tokens = args.groups * args.prompts * n
    results = {}
    weights = {p.data_ptr() for p in model.parameters()}
    with torch.no_grad():
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()  # warm-up (zo_fx: capture and rewrite of the decoding graphs)
            warm = time.perf_counter() - t0
            seconds = median_seconds(fn, args.repeats)
            memory = _cpu_peak(short[name], weights)
            results[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "warmup_s": warm,
                             "peak_mem_bytes": memory["peak_mem_bytes"]}
            mib = memory["peak_mem_bytes"] / 2**20
            print(f"{name:6s} {seconds:8.2f} s  {tokens / seconds:8.1f} tokens/s  peak {mib:8.1f} MiB  "
                  f"(warm-up {warm:.1f} s)", flush=True)
    floor, peers, ours = results["floor"], results["peers"], results["zo_fx"]
    summary = {
        "zo_fx_vs_floor_tokens_per_s": ours["tokens_per_s"] / floor["tokens_per_s"],
        "zo_fx_vs_peers_tokens_per_s": ours["tokens_per_s"] / peers["tokens_per_s"],
        "zo_fx_vs_floor_peak_mem": ours["peak_mem_bytes"] / floor["peak_mem_bytes"],
        **{f"{k}_vs_floor_tokens_per_s": results[k]["tokens_per_s"] / floor["tokens_per_s"]
           for k in results if k.startswith("zo_fx_lowrank")},
        **{f"{k}_vs_floor_peak_mem": results[k]["peak_mem_bytes"] / floor["peak_mem_bytes"]
           for k in results if k.startswith("zo_fx_lowrank")},
        "peers_vs_floor_peak_mem": peers["peak_mem_bytes"] / floor["peak_mem_bytes"],
    }
    meta = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "model": "SmolLM2-135M-Instruct float32", "groups": args.groups, "prompts": args.prompts,
            "new_tokens": n, "memory_tokens": args.memory_tokens,
            "directions": "full-rank Rademacher; low-rank ranks " + ", ".join(map(str, args.ranks)),
            "kv_cache": zm.decoder().cached,
            "command": "python benchmarks/generate.py " + " ".join(sys.argv[1:])}
    out = {"meta": meta, "results": results, "summary": summary}
    Path(args.out + ".json").parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    lines = [f"# Batched perturbed generation, {meta['model']}, G={args.groups}, B={args.prompts}, {n} new tokens",
             "", f"CPU: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}; `{meta['command']}`", "",
             "| way | seconds | tokens/s | vs floor | peak memory (MiB) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / floor['tokens_per_s']:.2f}x | {r['peak_mem_bytes'] / 2**20:.1f} |")
    lines += ["", f"zo_fx / peers: {summary['zo_fx_vs_peers_tokens_per_s']:.2f}x tokens/s; zo_fx memory "
              f"{summary['zo_fx_vs_floor_peak_mem']:.2f}x the floor's."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
