"""FZOO on several processes: the ranks share the direction seeds and exchange only group losses.

Launch with torchrun (gloo on CPUs, nccl on GPUs)::

    torchrun --nproc_per_node=2 examples/distributed_fzoo.py --help
    torchrun --nproc_per_node=2 examples/distributed_fzoo.py --strategy directions --steps 20
    torchrun --nproc_per_node=3 examples/distributed_fzoo.py --strategy data --batch-size 12 --out runs/dist

or as one plain process (``python examples/distributed_fzoo.py``) for the single-process run
with the same seeds. The default model is a tiny random Llama (a few seconds on a CPU);
``--model smollm2`` or any shape of :mod:`zo_fx.models` trains a bigger one. Every rank ends
with the same weights; rank 0 prints the losses and writes ``trajectory.json`` (replay it on
one process with ``zo_fx.replay``: it gives the same weights) and ``weights.safetensors``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import zo_fx
from zo_fx.models import load_model, synthetic_batch
from zo_fx.optim.distributed import batch_fingerprint, init_from_env, is_main_process


def tiny_llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.eval()


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="launch: torchrun --nproc_per_node=K examples/distributed_fzoo.py [options]")
    p.add_argument("--strategy", choices=zo_fx.optim.STRATEGIES, default="directions",
                   help="directions: each rank evaluates a share of the N+1 groups on the whole batch;\n"
                        "data: each rank evaluates every group on its shard of the batch (needs batch >= ranks)")
    p.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a shape of zo_fx.models "
                   "(random weights), or a save_pretrained folder")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--directions", type=int, default=8, help="N, FZOO's directions per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="the run seed: every rank must use the same")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait before failing")
    p.add_argument("--out", type=Path, default=None, help="folder for trajectory.json and weights (rank 0 writes)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    quiet = os.environ.get("RANK", "0") != "0"
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        args = parse(argv)  # --help on rank 0 only (before the group exists, torchrun's RANK tells)
    torch.set_num_threads(args.threads)
    init_from_env(timeout=args.timeout)  # a no-op outside torchrun: one process
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    say = print if is_main_process() else (lambda *a, **k: None)

    model = tiny_llama(args.seed) if args.model == "tiny" else load_model(args.model)[0]
    vocab = model.config.vocab_size
    batches = [synthetic_batch(vocab, args.batch_size, args.seq_len, seed=args.seed + i) for i in range(args.steps)]
    zm = zo_fx.zo_compile(model, batches[0])
    opt = zo_fx.FZOO(zm, lr=args.lr, eps=args.eps, n_directions=args.directions, seed=args.seed,
                     strategy=args.strategy)
    say(f"FZOO, {args.strategy}-parallel on {world} process(es), N={args.directions}, "
        f"{sum(p.numel() for p in opt.params.values()):,} trainable parameters")
    t0 = time.perf_counter()
    for batch in batches:  # every rank is given the same batch: the data strategy shards it itself
        info = opt.step(batch)
        say(f"step {info.step:3d}  loss {info.loss:.5f}  sigma {info.sigma:.2e}  {info.seconds:.2f} s"
            + (f"  skipped: {info.reason}" if info.skipped else ""))
    say(f"{args.steps / (time.perf_counter() - t0):.3f} steps/s")

    if world > 1:  # the ranks hold the same weights: check with one number per rank (a hash of every weight byte)
        digest = torch.tensor([float(batch_fingerprint({n: p.detach() for n, p in opt.params.items()}))],
                              dtype=torch.float64)
        every = [torch.empty_like(digest) for _ in range(world)]
        dist.all_gather(every, digest)
        say("every rank holds the same weights, bit for bit" if len({float(d) for d in every}) == 1
            else f"the ranks' weights differ (hashes {[int(d) for d in every]})")
    if args.out is not None and rank == 0:
        from safetensors.torch import save_file

        args.out.mkdir(parents=True, exist_ok=True)
        opt.trajectory.save(args.out / "trajectory.json")
        save_file({n: p.detach().contiguous() for n, p in opt.params.items()}, str(args.out / "weights.safetensors"))
        say(f"wrote {args.out / 'trajectory.json'} and weights.safetensors")
    if dist.is_initialized():
        dist.barrier()  # all ranks at teardown together (rank 0 may still be writing): destroy can hang otherwise
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
