"""FZOO steps per second on 1 vs 2 processes (1 thread each): direction-parallel and data-parallel, one run.

    python benchmarks/distributed.py                       # SmolLM2-135M shape, random weights, B=16 T=24 N=8
    python benchmarks/distributed.py --steps 2 --warmup 1 --model smollm2   # the real SmolLM2 weights (GGUF)

Each configuration starts its own processes (this file with ``--worker``, RANK/WORLD_SIZE set as
torchrun sets them, gloo, ``torch.set_num_threads(1)``), builds the same model from the same seed,
runs ``--warmup`` steps (graph rewrite and generator compilation) and times ``--steps`` more. The
processes of a configuration run side by side; configurations run one after another. Writes
``benchmarks/results/distributed_smollm2.json`` and a ``.txt`` table beside it.

On the wire each step: ``directions`` all-gathers a 3-number header and the rank's share of the
[G, B] per-example losses, ``data`` all-gathers G + 3 numbers; both counted here (bytes this rank
hands to the collectives per step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
CONFIGS = [("single", 1, "directions"), ("directions", 2, "directions"), ("data", 2, "data")]


def smollm2_shaped(seed: int = 0):
    """A random-initialised model with SmolLM2-135M's configuration (134.5M parameters, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         attn_implementation="sdpa", use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import zo_fx
    from zo_fx.models import load_model, synthetic_batch
    from zo_fx.optim.distributed import init_from_env

    torch.set_num_threads(1)
    init_from_env(timeout=1800)
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = smollm2_shaped() if args.model == "smollm2-random" else load_model(args.model)[0]
    batches = [synthetic_batch(model.config.vocab_size, args.batch_size, args.seq_len, seed=i)
               for i in range(args.warmup + args.steps)]
    zm = zo_fx.zo_compile(model, batches[0])
    opt = zo_fx.FZOO(zm, lr=1e-6, eps=1e-3, n_directions=args.directions, seed=0, strategy=args.strategy)
    sent = [0]
    if dist.is_initialized():
        original = dist.all_gather

        def counted(out, tensor, *a, **k):
            sent[0] += tensor.numel() * tensor.element_size()
            return original(out, tensor, *a, **k)

        dist.all_gather = counted
    t_warm = time.perf_counter()
    for b in batches[: args.warmup]:
        opt.step(b)
    warm_s = time.perf_counter() - t_warm
    sent[0] = 0
    infos = []
    t0 = time.perf_counter()
    for b in batches[args.warmup:]:
        infos.append(opt.step(b))
    total = time.perf_counter() - t0
    if rank == 0:
        Path(args.worker).write_text(json.dumps({
            "steps_per_s": args.steps / total, "seconds_per_step": total / args.steps, "warmup_s": warm_s,
            "forward_s": sum(i.timing["forward_s"] for i in infos) / len(infos),
            "update_s": sum(i.timing["update_s"] for i in infos) / len(infos),
            "wire_bytes_per_step": sent[0] / args.steps, "losses": [i.loss for i in infos],
            "parameters": sum(p.numel() for p in opt.params.values()),
        }))
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(name: str, world: int, strategy: str, args: argparse.Namespace, folder: Path) -> dict:
    out = folder / f"{name}.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(HERE), "--worker", str(out), "--strategy", strategy, "--model", args.model,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--directions", str(args.directions),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    procs = []
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        return {"error": f"exit codes {codes}"}
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t0
    # the 1-minute load average before and after: other work on the machine shares its cores with these processes
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def table(results: dict, settings: dict) -> str:
    single = results.get("single", {}).get("steps_per_s")
    lines = [f"FZOO on {settings['model']} ({settings['parameters']:,} parameters), B={settings['batch_size']} "
             f"T={settings['seq_len']} N={settings['directions']}, 1 thread per process, {settings['cpu']}",
             "",
             "| run | processes | steps/s | s/step | forward s | update s | speed-up | bytes/step/rank | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, world, _ in CONFIGS:
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | {world} | error: {r['error']} | | | | | | |")
            continue
        speed = f"{r['steps_per_s'] / single:.2f}x" if single else "-"
        lines.append(f"| {name} | {world} | {r['steps_per_s']:.4f} | {r['seconds_per_step']:.2f} | "
                     f"{r['forward_s']:.2f} | {r['update_s']:.2f} | {speed} | {r['wire_bytes_per_step']:.0f} | "
                     f"{r.get('load_average', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-random",
                   help="smollm2-random (SmolLM2-135M's shape, random weights: no download), smollm2, a shape "
                        "of zo_fx.models, or a save_pretrained folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (rewrite, compile)")
    p.add_argument("--strategy", default="directions", help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=RESULTS / "distributed_smollm2.json")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, world, strategy in CONFIGS:
            print(f"[distributed] {name}: {world} process(es) ...", flush=True)
            results[name] = launch(name, world, strategy, args, Path(tmp))
            print(f"[distributed] {name}: {results[name]}", flush=True)
    parameters = next((r["parameters"] for r in results.values() if "parameters" in r), 0)
    settings = {"model": args.model, "parameters": parameters, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "directions": args.directions, "steps": args.steps, "warmup": args.warmup,
                "threads_per_process": 1, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "backend": "gloo"}
    report = {"settings": settings, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    text = table(results, settings)
    args.json.with_suffix(".txt").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
