"""Convergence per forward pass: FZOO vs MeZO vs AdaMeZO (and Adam by steps) on one task.

DESIGN.md §7's convergence target: on a real model with real labels, FZOO reaches MeZO's
loss with at least 8x fewer forward passes, and AdaMeZO with fewer than MeZO. This script
measures exactly that. Every ZO method gets the same budget of forward passes over a batch
(FZOO spends N+1 per step, MeZO and AdaMeZO 2), the same data order and the same starting
weights; Adam (backprop) runs ``--adam-steps`` steps as a reference (one forward per step is
counted; its backward is not, so compare it by steps, not by forward passes).

For each method it records the training loss at every step and its trailing moving average
over a window of ``--smooth`` x budget forward passes (the same width in forward passes for
every method, so no method is smoothed more than another), then reports:

* the final smoothed training loss;
* the forward passes each method needed for its smoothed loss to reach MeZO's final smoothed
  loss (only points with a full window count, so early noise cannot cross), and the ratio to
  MeZO's own;
* test accuracy (and zero-shot test accuracy once).

Learning rates (``--lrs``): give one or several per method (``--lrs fzoo=1e-3,3e-3
mezo=1e-5``); with several, every one is run and the one with the lowest final smoothed
training loss represents the method (the others stay in the JSON). The defaults are the winners
of such a sweep on SmolLM2-135M / VADER (LoRA, B=16, budget 540), reported in the pull request
and in the JSON of that run.

Example (about 25 min on a 2-core CPU)::

    python benchmarks/convergence.py --json runs/convergence.json --plot runs/convergence.png
    python benchmarks/convergence.py --model tiny-folder --task reviews.jsonl --label-words pos=great,neg=terrible \\
        --template '{text} It was' --budget 40 --adam-steps 4    # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zo_fx  # noqa: E402
from zo_fx.finetune import (  # noqa: E402
    AdamBaseline,
    FinetuneConfig,
    FinetuneError,
    apply_peft,
    build_loss,
    build_task,
    evaluate,
    load_model_and_tokenizer,
    moving_average,
)

ZO_METHODS = ("fzoo", "mezo", "adamezo")
# Chosen by sweeps on SmolLM2-135M-Instruct / VADER with LoRA (B=16, budget 540 forward passes); see docstring.
DEFAULT_LRS = {"fzoo": [1e-3], "mezo": [1e-4], "adamezo": [1e-5], "adam": [1e-3]}


def parse_lrs(items: list[str]) -> dict[str, list[float]]:
    lrs = {m: list(v) for m, v in DEFAULT_LRS.items()}
    for item in items:
        method, _, values = item.partition("=")
        if method not in lrs or not values:
            raise SystemExit(f"--lrs {item!r}: write method=lr[,lr...] with method one of {', '.join(lrs)}")
        lrs[method] = [float(v) for v in values.split(",")]
    return lrs


def first_reach(forward_passes: list[int], smoothed: list[float], target: float, window: int) -> int | None:
    """Forward passes at the first step with a full smoothing window whose average is <= target."""
    for i in range(window - 1, len(smoothed)):
        if smoothed[i] <= target:
            return forward_passes[i]
    return None


def train_once(method: str, lr: float, seed: int, steps: int, args, model, zm, loss, task, tokenizer, initial):
    """One run from the initial weights; returns (forward passes per step, loss per step, seconds)."""
    live = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in initial.items():
            live[name].copy_(value)
    common = dict(lr=lr, eps=args.eps, seed=seed)
    if method == "fzoo":
        opt = zo_fx.FZOO(zm, n_directions=args.directions, **common)
    elif method == "mezo":
        opt = zo_fx.MeZO(zm, **common)
    elif method == "adamezo":
        opt = zo_fx.AdaMeZO(zm, horizon=args.horizon, **common)
    else:
        opt = AdamBaseline(model, loss, lr, 0.0, state_dir=Path("."))  # never checkpointed here
    cursor = task.cursor(args.batch_size, seed=seed)
    fwd, losses = [], []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{method} lr={lr:g} seed={seed}", unit="step", leave=False, dynamic_ncols=True)
    for _ in bar:
        info = opt.step(task.encode(tokenizer, cursor.next_batch(), args.max_length))
        fwd.append(info.forward_passes)
        losses.append(info.loss)  # NaN for a non-finite step; the moving average leaves it out
        bar.set_postfix_str(f"loss={info.loss:.4f} fwd={info.forward_passes}")
    return fwd, losses, time.perf_counter() - t0


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(model=args.model, task=args.task, label_words=args.label_words, template=args.template,
                         batch_size=args.batch_size, max_length=args.max_length, peft=args.peft, n_test=args.n_test,
                         seed=args.data_seed)
    task = build_task(cfg)
    model, tokenizer = load_model_and_tokenizer(args.model, torch.float32)
    model = apply_peft(model, args.peft, args.data_seed)
    loss = build_loss(task, tokenizer, model, args.peft)
    zm = zo_fx.zo_compile(model, task.encode(tokenizer, task.train[:args.batch_size], args.max_length), loss=loss)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    zero_shot = evaluate(model, task, tokenizer, loss, "test", args.max_length, desc="zero-shot test")
    lrs = parse_lrs(args.lrs)
    per_step = {"fzoo": args.directions + 1, "mezo": 2, "adamezo": 2}
    smooth_fwd = max(1, round(args.smooth * args.budget))
    runs = []
    for method in args.methods:
        steps = args.adam_steps if method == "adam" else args.budget // per_step[method]
        window = max(1, round(smooth_fwd / (1 if method == "adam" else per_step[method])))
        for lr in lrs[method]:
            per_seed, tests, seconds = [], [], 0.0
            for seed in args.seeds:
                fwd, losses, sec = train_once(method, lr, seed, steps, args, model, zm, loss, task, tokenizer, initial)
                per_seed.append(losses)
                seconds += sec
                tests.append(evaluate(model, task, tokenizer, loss, "test", args.max_length, desc=f"{method} test"))
            mean_loss = [sum(v) / len(v) for v in zip(*per_seed)]
            smoothed = moving_average(mean_loss, window)
            runs.append({
                "method": method, "lr": lr, "seeds": list(args.seeds), "steps": steps, "window_steps": window,
                "forward_passes": fwd[-1] if fwd else 0, "final_smoothed_loss": smoothed[-1] if smoothed else None,
                "test_accuracy": sum(t["accuracy"] for t in tests) / len(tests),
                "test_loss": sum(t["loss"] for t in tests) / len(tests),
                "test_accuracy_per_seed": [t["accuracy"] for t in tests], "seconds": seconds,
                "curve": {"forward_passes": fwd, "loss": mean_loss, "smoothed": smoothed},
            })
            print(f"{method} lr={lr:g}: final smoothed loss {runs[-1]['final_smoothed_loss']}, test accuracy "
                  f"{runs[-1]['test_accuracy']:.4f}, {seconds:.0f} s", flush=True)
    chosen = {}
    for method in args.methods:
        candidates = [r for r in runs if r["method"] == method and r["final_smoothed_loss"] is not None]
        if candidates:
            chosen[method] = min(candidates, key=lambda r: r["final_smoothed_loss"]
                                 if math.isfinite(r["final_smoothed_loss"]) else math.inf)
            chosen[method]["chosen"] = True
    target = mezo_reach = None
    if "mezo" in chosen:  # the yardstick: MeZO's final smoothed loss, and when MeZO itself first got there
        mezo = chosen["mezo"]
        target = mezo["final_smoothed_loss"]
        mezo_reach = first_reach(mezo["curve"]["forward_passes"], mezo["curve"]["smoothed"], target,
                                 mezo["window_steps"])
    for r in runs:
        reach = None if target is None else first_reach(r["curve"]["forward_passes"], r["curve"]["smoothed"], target,
                                                         r["window_steps"])
        r["forward_passes_to_mezo_loss"] = reach
        r["fewer_forward_passes_than_mezo"] = (mezo_reach / reach) if reach and mezo_reach else None
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
        "task": task.name, "sizes": {s: len(getattr(task, s)) for s in ("train", "validation", "test")},
        "trainable_parameters": sum(p.numel() for p in initial.values()),
        "zero_shot_test_accuracy": zero_shot["accuracy"], "zero_shot_test_loss": zero_shot["loss"],
        "smoothing_forward_passes": smooth_fwd, "mezo_final_smoothed_loss": target,
        "mezo_forward_passes_to_own_final": mezo_reach, "runs": runs,
    }


def table(result: dict) -> str:
    lines = ["| method | lr | steps | forward passes | final loss (smoothed) | fwd to MeZO's loss | fewer fwd than MeZO "
             "| test acc |  seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        reach = r["forward_passes_to_mezo_loss"]
        ratio = r["fewer_forward_passes_than_mezo"]
        mark = " *" if r.get("chosen") else ""
        fwd = f"{r['forward_passes']} (+backward)" if r["method"] == "adam" else str(r["forward_passes"])
        final = "-" if r["final_smoothed_loss"] is None else f"{r['final_smoothed_loss']:.4f}"
        lines.append(f"| {r['method']}{mark} | {r['lr']:g} | {r['steps']} | {fwd} | {final} | "
                     f"{'not reached' if reach is None else reach} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{r['test_accuracy']:.4f} | {r['seconds']:.0f} |")
    lines.append(f"zero-shot test accuracy {result['zero_shot_test_accuracy']:.4f}; smoothing window "
                 f"{result['smoothing_forward_passes']} forward passes; * = the lr representing the method")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"fzoo": "tab:blue", "mezo": "tab:red", "adamezo": "tab:green", "adam": "tab:gray"}
    for r in result["runs"]:
        c = r["curve"]
        style = "-" if r.get("chosen") else ":"
        label = f"{r['method']} lr={r['lr']:g}" + (" (by steps, backward not counted)" if r["method"] == "adam" else "")
        ax.plot(c["forward_passes"], c["smoothed"], style, color=colors[r["method"]], lw=2 if r.get("chosen") else 1,
                label=label)
    if result["mezo_final_smoothed_loss"] is not None:
        ax.axhline(result["mezo_final_smoothed_loss"], color="tab:red", ls="--", lw=0.8, label="MeZO's final loss")
    s = result["settings"]
    ax.set(xlabel="forward passes over a batch", ylabel="training loss (moving average)",
           title=f"{result['task']}, {s['model']}, peft={s['peft']}, B={s['batch_size']}, budget {s['budget']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="as zo-fx finetune --model (default: %(default)s)")
    p.add_argument("--task", default="vader", help="as zo-fx finetune --task (default: %(default)s)")
    p.add_argument("--label-words", help="as zo-fx finetune --label-words")
    p.add_argument("--template", help="as zo-fx finetune --template")
    p.add_argument("--peft", default="lora", choices=["none", "lora", "prompt"], help="what trains (default: "
                   "%(default)s; 'none' is full fine-tuning, several times slower per step on a CPU)")
    p.add_argument("--methods", nargs="+", default=[*ZO_METHODS, "adam"], choices=[*ZO_METHODS, "adam"],
                   help="methods to run (default: all; MeZO is the yardstick of the 'fwd to MeZO's loss' column)")
    p.add_argument("--budget", type=int, default=540, help="forward passes per ZO run (default: %(default)s)")
    p.add_argument("--adam-steps", type=int, help="Adam's steps (default: as many as FZOO takes)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="optimizer and data-order seeds; curves are "
                   "averaged over them (default: 0)")
    p.add_argument("--data-seed", type=int, default=0, help="task subsampling and adapter init (default: 0)")
    p.add_argument("--lrs", nargs="*", default=[], help="method=lr[,lr...] (defaults: "
                   + ", ".join(f"{m}={v[0]:g}" for m, v in DEFAULT_LRS.items()) + ")")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--horizon", type=int, default=10)
    p.add_argument("--smooth", type=float, default=0.1, help="moving-average width as a fraction of the budget "
                   "(default: %(default)s)")
    p.add_argument("--n-test", type=int, help="test examples (default: the task's)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=Path("runs/convergence.json"))
    p.add_argument("--plot", type=Path, default=Path("runs/convergence.png"))
    args = p.parse_args(argv)
    if args.adam_steps is None:
        args.adam_steps = args.budget // (args.directions + 1)
    t0 = time.perf_counter()
    try:
        result = run(args)
    except FinetuneError as err:
        raise SystemExit(f"convergence: error: {err}") from None
    result["wall_seconds"] = time.perf_counter() - t0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    print(table(result))
    print(f"wrote {args.json} and {args.plot} in {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
