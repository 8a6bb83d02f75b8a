"""``benchmarks/step.py --sweep``: step time against the floor over model sizes and tokens per step.

One process, one run: for every model of ``--sweep-models`` and every batch shape ``BxT`` of
``--sweep-shapes`` (tokens per step B*T from 64 to 1024 by default), the methods of
``--methods`` run side by side exactly as in ``step.py`` (fresh copy of the weights each, median
of ``--repeats`` timed steps, peak memory in one more step), so every ratio is like for like:

    python benchmarks/step.py --sweep --threads 2 --json benchmarks/results/step_sweep_cpu.json

Per method and shape the JSON and the table give the step time, forward passes, the bytes of
weights the step moves (estimated from the path it takes, :func:`weight_bytes`), the achieved
rate of those bytes against a memcpy of the same weights, the update pass's own rate (it reads
and writes every trainable element once: ``2 * trainable bytes / update seconds``) and the
peak memory. The plot shows seconds per forward pass over the faster floor's (for FZOO, step /
floor) against tokens per step, one line per model and method.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

#: (model, "BxT" shapes) of the default sweep: 64 to 1024 tokens at 135M, 64 and 128 at 1.2B
#: (a 1.2B FZOO step over 1024 tokens takes minutes on a 2-core CPU)
DEFAULT_MODELS = ("smollm2", "llama-1b")
DEFAULT_SHAPES = {"smollm2": ("4x16", "16x16", "16x24", "16x64"), "llama-1b": ("4x16", "8x16")}
DEFAULT_METHODS = ("zo_fx_fzoo", "zo_fx_mezo", "reference_mezo", "floor", "floor_per_copy")


def parse_shape(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a batch shape is BxT, e.g. 16x24; got {text!r}") from None
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"B and T must be positive; got {text!r}")
    return b, t


def memcpy_gbs(tensors: list[torch.Tensor], repeats: int = 3) -> float:
    """GB/s of copying ``tensors`` into preallocated buffers (bytes read + written), best of ``repeats``."""
    outs = [torch.empty_like(t) for t in tensors]
    total = 2 * sum(t.numel() * t.element_size() for t in tensors)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for o, t in zip(outs, tensors):
            o.copy_(t)
        best = min(best, time.perf_counter() - t0)
    return total / best / 1e9


def _head_bytes(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.weight.numel() * head.weight.element_size() if head is not None else 0


def weight_bytes(name: str, model: torch.nn.Module, groups: int) -> int:
    """Bytes of weights one step of ``name`` reads and writes on the CPU torch path.

    * zo_fx: every weight matrix once for all groups (the blocked GEMM; the perturbed tiles
      stay in cache), the output head once per group (its loss runs one group at a time),
      the embedding only at the looked-up rows (not counted), and the update pass's read +
      write of every trainable element.
    * ``floor`` (one batch): the weights once; ``floor_per_copy``: once per copy.
    * ``reference_*``: per direction, a perturb pass (read + write), the forward's read and a
      restore (read + write) for each evaluation, and the update's read + write.
    """
    params = [p for p in model.parameters()]
    total = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    head = _head_bytes(model)
    embed = model.get_input_embeddings().weight
    embed_bytes = embed.numel() * embed.element_size()
    body = total - embed_bytes - (0 if head and model.get_output_embeddings().weight is embed else head)
    if name.startswith("zo_fx"):
        return body + groups * head + 2 * trainable
    if name == "floor":
        return body + head
    if name == "floor_per_copy":
        return groups * (body + head)
    # reference: G evaluations, each perturb (r+w) + forward (r) + restore (r+w), then the update (r+w)
    return groups * (5 * total) + 2 * trainable


def _groups(name: str, directions: int) -> int:
    return directions + 1 if name.endswith("fzoo") or name.startswith("floor") else 2


def run_sweep(step_module, args: argparse.Namespace) -> dict:
    """All models x shapes x methods; returns {"settings", "runs": [{model, B, T, tokens, methods}]}."""
    from zo_fx.models import load_model, synthetic_batch

    models = args.sweep_models or list(DEFAULT_MODELS)
    runs = []
    plan = [(m, s) for m in models for s in (args.sweep_shapes or DEFAULT_SHAPES.get(m, ("4x16", "16x64")))]
    steps = len(plan) * len(args.methods) * (args.warmup + args.repeats + 1)
    with tqdm(total=steps, unit="step") as bar:
        for model_name in models:
            master, _ = load_model(model_name, step_module.DTYPES[args.dtype])
            exclude = step_module._storage_ptrs(master)
            weights = [p.detach() for p in master.parameters()]
            copy_gbs = memcpy_gbs(weights)
            trainable = sum(p.numel() * p.element_size() for p in master.parameters() if p.requires_grad)
            for shape in [s for m, s in plan if m == model_name]:
                b, t = parse_shape(shape) if isinstance(shape, str) else shape
                args.batch_size, args.seq_len = b, t
                batch = synthetic_batch(master.config.vocab_size, b, t)
                methods = {}
                for name in args.methods:
                    bar.set_description(f"{model_name} {b}x{t} {name}")
                    r = step_module.run_method(name, master, batch, args, exclude, bar)
                    moved = weight_bytes(name, master, _groups(name, args.directions))
                    r["weight_bytes_moved"] = moved
                    r["weight_gbs"] = moved / r["step_s"] / 1e9
                    r["weight_gbs_vs_memcpy"] = r["weight_gbs"] / copy_gbs
                    update_s = (r.get("timing") or {}).get("update_s")
                    r["update_gbs"] = 2 * trainable / update_s / 1e9 if update_s else None
                    methods[name] = r
                floor = step_module.add_ratios(methods)
                runs.append({"model": model_name, "batch_size": b, "seq_len": t, "tokens": b * t, "floor": floor,
                             "memcpy_gbs": copy_gbs, "params": sum(p.numel() for p in weights), "methods": methods})
                bar.write(sweep_table(runs[-1:]))
            del master, weights
            gc.collect()
    return {"runs": runs}


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def sweep_table(runs: list[dict]) -> str:
    lines = [
        "| model | BxT | method | step s | fwd | vs floor | s/fwd vs floor | weight GB moved | GB/s (vs memcpy) "
        "| update GB/s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for name, r in run["methods"].items():
            lines.append(
                f"| {run['model']} | {run['batch_size']}x{run['seq_len']} | {name} | {r['step_s']:.3f} "
                f"| {r['forward_passes_per_step']} | {_f(r['ratios']['step_vs_floor'], '.2f')}x "
                f"| {_f(per_forward_vs_floor(run, name), '.2f')}x "
                f"| {r['weight_bytes_moved'] / 1e9:.2f} | {r['weight_gbs']:.1f} ({r['weight_gbs_vs_memcpy']:.2f}) "
                f"| {_f(r['update_gbs'], '.1f')} | {r['peak_mem_bytes'] / 2**20:.0f} |"
            )
    memcpy = sorted({(run["model"], round(run["memcpy_gbs"], 1)) for run in runs})
    lines.append("")
    lines.append("memcpy of the weights, GB/s (read + write): " + ", ".join(f"{m} {g}" for m, g in memcpy))
    return "\n".join(lines)


def per_forward_vs_floor(run: dict, name: str) -> float | None:
    """Seconds per forward pass of ``name`` over the faster floor's: FZOO's step / floor, and
    comparable for MeZO, whose step makes 2 forward passes where the floor makes N+1."""
    floor = run["methods"].get(run["floor"]) if run["floor"] else None
    mine = run["methods"][name]
    return mine["s_per_forward"] / floor["s_per_forward"] if floor else None


def plot_sweep(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        for name in mine[0]["methods"]:
            points = [(r["tokens"], per_forward_vs_floor(r, name)) for r in mine if name in r["methods"]]
            points = [p for p in points if p[1] is not None]
            if points and not name.startswith("floor"):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=f"{model} {name}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per step (B x T)")
    ax.set_ylabel("seconds per forward pass / the faster floor's")
    ax.legend(fontsize=8)
    ax.set_title("cost of a forward pass against plain inference on the same examples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_sweep(step_module, args: argparse.Namespace) -> dict:
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_sweep(step_module, args)
        args.threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(torch=torch.__version__)
    result = {"settings": settings, **result}
    table = sweep_table(result["runs"])
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        args.json.with_suffix(".md").write_text(table + "\n")
    if args.plot is not None:
        plot_sweep(result["runs"], args.plot)
    return result
