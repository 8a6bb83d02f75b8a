"""Convergence per forward pass: FZOO vs MeZO vs AdaMeZO (and Adam by steps) on one task.

DESIGN.md §7's convergence target: on a real model with real labels, FZOO reaches MeZO's
loss with at least 8x fewer forward passes, and AdaMeZO with fewer than MeZO. This script
measures that. Every ZO method gets the same budget of forward passes over a batch (FZOO
spends N+1 per step, MeZO and AdaMeZO 2), the same data order and the same starting weights;
Adam (backprop) runs ``--adam-steps`` steps as a reference (one forward per step is counted,
its backward is not, so compare it by steps; it gets no ratio).

Two training-loss curves per method, both against forward passes:

* probe: the loss of the current weights on a fixed set of ``--probe-size`` training examples,
  ``--probes`` times per run. Every point sees the same examples, so the curve has no batch
  noise; this is the curve the comparison trusts.
* smoothed: the per-step batch loss, moving-averaged over ``--smooth`` x budget forward passes
  (the same width in forward passes for every method). It still carries batch noise, more for
  FZOO (fewer batches per forward pass), and only points with a full window count.

Reported per method: final losses; the forward passes it needed to reach MeZO's final loss
(first point at or below it) and the ratio to MeZO's own; test accuracy (and zero-shot once).

Learning rates (``--lrs``): one or several per method (``--lrs fzoo=1e-2,3e-2:linear mezo=1e-3``;
``:linear`` decays that run's lr linearly to 0 over its steps); with several, every one runs and
the lowest final probe loss represents the method. The defaults are the best of sweeps on
SmolLM2-135M-Instruct / VADER with LoRA r=8, B=16 (numbers in zo_fx/finetune/config.py beside
DEFAULT_PEFT_LR, and below): FZOO 3e-2 with linear decay, MeZO 1e-3, AdaMeZO 1e-5, Adam 1e-3.

Measured on this 2-core CPU (``--threads 2``; LoRA, budget 450 forward passes, B=16, curves
averaged over seeds 0 and 1; JSON and PNG in benchmarks/results/convergence_smollm2_lora*):

``python benchmarks/convergence.py --threads 2 --seeds 0 1 --lrs fzoo=1e-2,3e-2`` (57 min) and
``python benchmarks/convergence.py --threads 2 --seeds 0 1 --methods fzoo mezo
--lrs fzoo=2e-2:linear,3e-2:linear``

| method | lr | fwd | probe loss | fwd to MeZO's | vs MeZO | smoothed | fwd to MeZO's | vs MeZO | test acc |
|---|---|---|---|---|---|---|---|---|---|
| fzoo | 3e-2, linear decay | 450 | 0.2193 | 81 | 5.56x | 0.2456 | 99 | 3.23x | 0.9066 |
| fzoo | 2e-2, linear decay | 450 | 0.2982 | 108 | 4.17x | 0.2989 | 99 | 3.23x | 0.8936 |
| fzoo | 1e-2 | 450 | 0.2909 | 189 | 2.38x | 0.3119 | 108 | 2.96x | 0.8798 |
| fzoo | 3e-2 | 450 | 0.4795 | 81 | 5.56x | 0.3898 | 99 | 3.23x | 0.7760 |
| mezo | 1e-3 | 450 | 0.3868 | 450 | 1.00x | 0.4559 | 320 | 1.00x | 0.8304 |
| adamezo | 1e-5 | 450 | 0.3728 | 352 | 1.28x | 0.4386 | 306 | 1.05x | 0.8452 |
| adam | 1e-3 | 50 steps (+bwd) | 0.1590 | 2 | - | 0.1377 | 5 | - | 0.9524 |

Zero-shot test accuracy 0.7699 (probe loss 0.438). MeZO's run is bit-for-bit the same in both
invocations (final probe loss 0.3868). AdaMeZO reaches MeZO's loss with fewer forward passes
(1.28x on the probe, 1.05x on the smoothed curve). FZOO reaches it 5.6x sooner (its probe is
taken every 27 forward passes; the crossing lies between 54 and 81), short of DESIGN's 8x.
At a constant 3e-2 FZOO falls fastest and then becomes unstable (probe loss 0.28 at 270 forward
passes, 0.48 at the end); decaying the same lr linearly keeps the early speed and ends lowest.

Example::

    python benchmarks/convergence.py --json runs/convergence.json --plot runs/convergence.png
    python benchmarks/convergence.py --model tiny-folder --task reviews.jsonl \\
        --label-words pos=great,neg=terrible --template '{text} It was' \\
        --budget 40 --adam-steps 4    # smoke run
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

# zo_fx is imported after the sys.path line, so the script runs from a checkout
from zo_fx.compile import zo_compile  # noqa: E402
from zo_fx.finetune import (  # noqa: E402
    LR_SCHEDULES,
    AdamBaseline,
    FinetuneConfig,
    FinetuneError,
    apply_peft,
    build_loss,
    build_task,
    evaluate,
    forward_passes_per_step,
    linear_decay,
    load_model_and_tokenizer,
    moving_average,
    zo_optimizer,
)

ZO_METHODS = ("fzoo", "mezo", "adamezo", "es", "zosgd_momentum", "zoadam", "hizoo")
# Chosen by sweeps on SmolLM2-135M-Instruct / VADER with LoRA (B=16, 270 forward passes); see the docstring.
# ES, ZO-SGD with momentum and ZO-Adam start from their job defaults (zo_fx/finetune/config.py, by analogy).
DEFAULT_LRS = {"fzoo": ["3e-2:linear"], "mezo": ["1e-3"], "adamezo": ["1e-5"], "es": ["1e-5"],
               "zosgd_momentum": ["1e-4"], "zoadam": ["1e-3"], "hizoo": ["1e-3"], "adam": ["1e-3"]}
#: a method entry ``name``, ``name:lowrankR`` (low-rank directions of rank R) or ``name:lowrankR:lazyK`` (factor B
#: kept for K steps, LOZO); lrs are the method's
KIND_SUFFIX = ":lowrank"
LAZY_SUFFIX = ":lazy"


def split_entry(entry: str) -> tuple[str, dict]:
    """``"fzoo:lowrank2"`` -> ``("fzoo", {"kind": "lowrank", "rank": 2})``; ``"mezo:lowrank1:lazy5"`` -> ``("mezo",
    {"kind": "lowrank", "rank": 1, "lazy_steps": 5})``; ``"mezo"`` -> ``("mezo", {})``."""
    method, _, rest = entry.partition(KIND_SUFFIX)
    rank, _, lazy = rest.partition(LAZY_SUFFIX)
    if (rank and not rank.isdigit() or lazy and not lazy.isdigit() or method not in (*ZO_METHODS, "adam")
            or (rank and method in ("adam", "hizoo")) or (LAZY_SUFFIX in rest and not lazy)):
        raise SystemExit(f"--methods {entry!r}: write a method ({', '.join(ZO_METHODS)}, adam), optionally "
                         f"followed by {KIND_SUFFIX}R for low-rank directions of rank R (ZO methods but hizoo) "
                         f"and {LAZY_SUFFIX}K to keep factor B for K steps")
    kind = {"kind": "lowrank", "rank": int(rank)} if rank else {}
    return method, kind | ({"lazy_steps": int(lazy)} if lazy else {})


def parse_lrs(items: list[str]) -> dict[str, list[tuple[float, str]]]:
    """``["fzoo=1e-2,3e-2:linear"]`` -> ``{"fzoo": [(0.01, "constant"), (0.03, "linear")], ...defaults}``.

    ``:linear`` decays that run's lr linearly to 0 over its steps (ZO methods only).
    """
    lrs = {}
    for item in [f"{m}={','.join(v)}" for m, v in DEFAULT_LRS.items()] + list(items):
        method, _, values = item.partition("=")
        if method not in DEFAULT_LRS or not values:
            raise SystemExit(f"--lrs {item!r}: write method=lr[,lr[:linear]...] with method one of "
                             f"{', '.join(DEFAULT_LRS)}")
        lrs[method] = []
        for value in values.split(","):
            lr, _, schedule = value.partition(":")
            schedule = schedule or "constant"
            if schedule not in LR_SCHEDULES or (schedule != "constant" and method == "adam"):
                raise SystemExit(f"--lrs {item!r}: the schedule after ':' is one of {LR_SCHEDULES} "
                                 "(adam: constant only)")
            lrs[method].append((float(lr), schedule))
    return lrs


def label(lr: float, schedule: str) -> str:
    return f"{lr:g}" if schedule == "constant" else f"{lr:g}:{schedule}"


def first_reach(points: list[tuple[int, float]], target: float, skip: int = 0) -> int | None:
    """Forward passes at the first point (after the first ``skip``) whose loss is <= target."""
    for fwd, value in points[skip:]:
        if value <= target:
            return fwd
    return None


class Probe:
    """The loss of the current weights on a fixed set of training examples: a noise-free training curve.

    The per-step loss is measured on a fresh batch each step, so its moving average still carries
    the batch-to-batch noise, more of it for a method with fewer steps per forward pass (FZOO).
    A fixed probe set sees the same examples at every point, for every method.
    """

    def __init__(self, task, tokenizer, loss, max_length: int, size: int):
        from zo_fx.passes.capture import model_output_tensor
        from zo_fx.tasks.splits import subsample

        self.batch = task.encode(tokenizer, subsample(task.train, size, seed=1234), max_length)
        self.loss, self._output = loss, model_output_tensor

    @torch.no_grad()
    def __call__(self, model) -> float:
        outputs = model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"])
        logits = self._output(outputs)
        return float(self.loss(logits, self.batch).double().mean())


def train_once(entry: str, lr: float, schedule: str, seed: int, steps: int, per_probe: int, args,
               setup) -> dict:
    """One run from the initial weights: the loss of every step, probe losses, seconds (probes excluded)."""
    method, kind = split_entry(entry)
    model, zm, loss, task, tokenizer, initial, probe = setup
    live = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in initial.items():
            live[name].copy_(value)
    if method == "adam":
        opt = AdamBaseline(model, loss, lr, 0.0, state_dir=Path("."))  # never checkpointed here
    else:
        decay = (lambda step: linear_decay(lr, step, steps)) if schedule == "linear" else None
        opt = zo_optimizer(method, zm, lr=lr, eps=args.eps, seed=seed, directions=args.directions,
                           horizon=args.horizon, lr_schedule=decay, **kind)
    cursor = task.cursor(args.batch_size, seed=seed)
    fwd, losses, step_lrs, probes, seconds = [], [], [], [(0, probe(model))], 0.0
    bar = tqdm(range(steps), desc=f"{entry} lr={label(lr, schedule)} seed={seed}", unit="step", leave=False,
               dynamic_ncols=True)
    for _ in bar:
        t0 = time.perf_counter()
        info = opt.step(task.encode(tokenizer, cursor.next_batch(), args.max_length))
        seconds += time.perf_counter() - t0
        fwd.append(info.forward_passes)
        step_lrs.append(info.lr)
        losses.append(info.loss)  # NaN for a non-finite step; the moving average leaves it out
        if info.forward_passes >= probes[-1][0] + per_probe or len(fwd) == steps:
            probes.append((info.forward_passes, probe(model)))
        bar.set_postfix_str(f"loss={info.loss:.4f} fwd={info.forward_passes} probe={probes[-1][1]:.4f}")
    if method == "adam":  # AdamW's moments (and step counts)
        state = [t for st in opt.torch_optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    else:  # a stateful method's stored buffers; none for the others
        state = list(opt.state_tensors().values())
    state_mib = sum(t.numel() * t.element_size() for t in state) / 2**20
    return {"fwd": fwd, "losses": losses, "lrs": step_lrs, "probes": probes, "seconds": seconds,
            "state_mib": state_mib, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (MiB): it only grows, so a run's figure includes the ones before."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(model=args.model, task=args.task, label_words=args.label_words,
                         template=args.template, batch_size=args.batch_size, max_length=args.max_length,
                         peft=args.peft, n_test=args.n_test, seed=args.data_seed)
    task = build_task(cfg)
    model, tokenizer = load_model_and_tokenizer(args.model, torch.float32)
    model = apply_peft(model, args.peft, args.data_seed)
    loss = build_loss(task, tokenizer, model, args.peft)
    zm = zo_compile(model, task.encode(tokenizer, task.train[:args.batch_size], args.max_length), loss=loss)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    probe = Probe(task, tokenizer, loss, args.max_length, args.probe_size)
    setup = (model, zm, loss, task, tokenizer, initial, probe)
    zero_shot = evaluate(model, task, tokenizer, loss, "test", args.max_length, desc="zero-shot test")
    lrs = parse_lrs(args.lrs)
    per_step = {m: forward_passes_per_step(m, args.directions) for m in (*ZO_METHODS, "adam")}
    smooth_fwd = max(1, round(args.smooth * args.budget))
    runs = []
    for entry in args.methods:
        method, _ = split_entry(entry)
        steps = args.adam_steps if method == "adam" else args.budget // per_step[method]
        span = steps * per_step[method]
        per_probe = max(1, span // args.probes)
        window = max(1, round((args.smooth * span if method == "adam" else smooth_fwd) / per_step[method]))
        for lr, schedule in lrs[method]:
            done, tests = [], []
            for seed in args.seeds:
                done.append(train_once(entry, lr, schedule, seed, steps, per_probe, args, setup))
                tests.append(evaluate(model, task, tokenizer, loss, "test", args.max_length,
                                      desc=f"{method} test"))
            broken = [t for t in tests if t["accuracy"] is None]
            if broken:  # never average an accuracy computed from NaN outputs
                raise SystemExit(f"{method} lr {lr:g}: the trained model's test outputs are non-finite on "
                                 f"{broken[0]['non_finite']} examples; lower the lr in --lrs")
            mean_loss = [sum(v) / len(v) for v in zip(*(d["losses"] for d in done))]
            probes = [(pts[0][0], sum(p[1] for p in pts) / len(pts))
                      for pts in zip(*(d["probes"] for d in done))]
            smoothed = moving_average(mean_loss, window)
            fwd = done[0]["fwd"]
            runs.append({
                "method": entry, "lr": lr, "schedule": schedule, "seeds": list(args.seeds), "steps": steps,
                "window_steps": window,
                "forward_passes": fwd[-1] if fwd else 0,
                "final_smoothed_loss": smoothed[-1] if smoothed else None, "final_probe_loss": probes[-1][1],
                "test_accuracy": sum(t["accuracy"] for t in tests) / len(tests),
                "test_loss": sum(t["loss"] for t in tests) / len(tests),
                "test_accuracy_per_seed": [t["accuracy"] for t in tests],
                "seconds": sum(d["seconds"] for d in done),
                "optimizer_state_mib": done[0]["state_mib"], "peak_rss_mib": max(d["peak_rss_mib"] for d in done),
                "curve": {"forward_passes": fwd, "loss": mean_loss, "smoothed": smoothed,
                          "lr": done[0]["lrs"]},
                "probe": {"forward_passes": [p[0] for p in probes], "loss": [p[1] for p in probes]},
            })
            r = runs[-1]
            print(f"{entry} lr={label(lr, schedule)}: final smoothed loss {r['final_smoothed_loss']}, "
                  f"probe loss {r['final_probe_loss']:.4f}, test accuracy {r['test_accuracy']:.4f}, "
                  f"{r['seconds']:.0f} s", flush=True)
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "task": task.name, "sizes": {s: len(getattr(task, s)) for s in ("train", "validation", "test")},
        "trainable_parameters": sum(p.numel() for p in initial.values()),
        "zero_shot_test_accuracy": zero_shot["accuracy"], "zero_shot_test_loss": zero_shot["loss"],
        "smoothing_forward_passes": smooth_fwd, "runs": runs, **compare(runs, args.methods),
    }


def compare(runs: list[dict], methods: list[str]) -> dict:
    """Pick each method's lr (lowest final probe loss) and measure everyone against MeZO's final loss."""
    def final(r):
        return r["final_probe_loss"] if math.isfinite(r["final_probe_loss"]) else math.inf

    chosen = {}
    for method in methods:
        candidates = [r for r in runs if r["method"] == method]
        if candidates:
            chosen[method] = min(candidates, key=final)
            chosen[method]["chosen"] = True
    out = {"mezo_final_probe_loss": None, "mezo_final_smoothed_loss": None}
    if "mezo" not in chosen:
        return out
    mezo = chosen["mezo"]
    out.update(mezo_final_probe_loss=mezo["final_probe_loss"],
               mezo_final_smoothed_loss=mezo["final_smoothed_loss"])

    def reach(r, kind: str) -> int | None:
        if kind == "probe":
            points = list(zip(r["probe"]["forward_passes"], r["probe"]["loss"]))
            return first_reach(points, mezo["final_probe_loss"], skip=1)
        points = list(zip(r["curve"]["forward_passes"], r["curve"]["smoothed"]))
        full_windows_only = r["window_steps"] - 1
        return first_reach(points, mezo["final_smoothed_loss"], skip=full_windows_only)

    for kind in ("probe", "smoothed"):
        own = reach(mezo, kind)
        for r in runs:
            r[f"forward_passes_to_mezo_{kind}_loss"] = hit = reach(r, kind)
            comparable = r["method"] != "adam"  # Adam's backward passes are not counted: no ratio
            r[f"fewer_forward_passes_than_mezo_{kind}"] = own / hit if hit and own and comparable else None
    return out


def table(result: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [("| method | lr | steps | forward passes | final probe loss | fwd to MeZO's probe loss | "
              "fewer fwd than MeZO | final smoothed loss | fwd to MeZO's smoothed loss | "
              "fewer fwd than MeZO | test acc | seconds | optimizer state MiB |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        mark = " *" if r.get("chosen") else ""
        fwd = f"{r['forward_passes']} (+backward)" if r["method"] == "adam" else str(r["forward_passes"])
        cells = [f"{r['method']}{mark}", label(r["lr"], r.get("schedule", "constant")), str(r["steps"]), fwd,
                 num(r["final_probe_loss"], ".4f")]
        for kind in ("probe", "smoothed"):
            if kind == "smoothed":
                cells.append(num(r["final_smoothed_loss"], ".4f"))
            hit = r.get(f"forward_passes_to_mezo_{kind}_loss")
            ratio = r.get(f"fewer_forward_passes_than_mezo_{kind}")
            cells += ["not reached" if hit is None else str(hit), num(ratio, ".2f") + ("x" if ratio else "")]
        cells += [f"{r['test_accuracy']:.4f}", f"{r['seconds']:.0f}", f"{r.get('optimizer_state_mib', 0.0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"zero-shot test accuracy {result['zero_shot_test_accuracy']:.4f}; probe = loss on a fixed "
                 f"set of {result['settings']['probe_size']} training examples; smoothed = moving average of "
                 f"the per-step loss over {result['smoothing_forward_passes']} forward passes; * = the lr "
                 "representing the method; adam is compared by steps (its backward passes are not counted)")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_p) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"fzoo": "tab:blue", "mezo": "tab:red", "adamezo": "tab:green", "es": "tab:orange",
              "zosgd_momentum": "tab:purple", "zoadam": "tab:brown", "hizoo": "tab:olive", "adam": "tab:gray"}
    for r in result["runs"]:
        style, lw = ("-", 2) if r.get("chosen") else (":", 1)
        if KIND_SUFFIX in r["method"]:  # low-rank directions: dashed (lazy: dash-dot), in the method's colour
            style = ("-." if LAZY_SUFFIX in r["method"] else "--") if r.get("chosen") else ":"
        name = f"{r['method']} lr={label(r['lr'], r.get('schedule', 'constant'))}"
        name += " (steps; backward not counted)" if r["method"] == "adam" else ""
        color = colors[split_entry(r["method"])[0]]
        ax_s.plot(r["curve"]["forward_passes"], r["curve"]["smoothed"], style, color=color, lw=lw, label=name)
        ax_p.plot(r["probe"]["forward_passes"], r["probe"]["loss"], style, marker=".", color=color, lw=lw,
                  label=name)
    for ax, key in ((ax_s, "mezo_final_smoothed_loss"), (ax_p, "mezo_final_probe_loss")):
        if result[key] is not None:
            ax.axhline(result[key], color="tab:red", ls="--", lw=0.8, label="MeZO's final loss")
    s = result["settings"]
    ax_s.set(xlabel="forward passes over a batch", ylabel="training loss",
             title=f"per-step loss, moving average over {result['smoothing_forward_passes']} forward passes")
    ax_p.set(xlabel="forward passes over a batch", ylabel="training loss",
             title=f"loss on a fixed set of {s['probe_size']} training examples")
    ax_p.legend(fontsize=8)
    fig.suptitle(f"{result['task']}, {s['model']}, peft={s['peft']}, B={s['batch_size']}, "
                 f"budget {s['budget']} forward passes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="as zo-fx finetune --model (default: %(default)s)")
    p.add_argument("--task", default="vader", help="as zo-fx finetune --task (default: %(default)s)")
    p.add_argument("--label-words", help="as zo-fx finetune --label-words")
    p.add_argument("--template", help="as zo-fx finetune --template")
    p.add_argument("--peft", default="lora", choices=["none", "lora", "prompt"], help="what trains (default: "
                   "%(default)s; 'none' is full fine-tuning, several times slower per step on a CPU)")
    p.add_argument("--methods", nargs="+", default=[*ZO_METHODS, "adam"],
                   help="methods to run, each optionally with :lowrankR for low-rank directions of rank R, e.g. "
                   "'fzoo fzoo:lowrank2 mezo' (default: every method, full rank; MeZO is the yardstick of the "
                   "'fwd to MeZO's loss' column)")
    p.add_argument("--budget", type=int, default=450, help="forward passes per ZO run (default: %(default)s)")
    p.add_argument("--adam-steps", type=int, help="Adam's steps (default: as many as FZOO takes)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="optimizer and data-order seeds; curves "
                   "are averaged over them (default: 0)")
    p.add_argument("--data-seed", type=int, default=0, help="task subsampling and adapter init (default: 0)")
    p.add_argument("--lrs", nargs="*", default=[], help="method=lr[,lr...]; lr:linear decays that run's lr "
                   "linearly to 0 (defaults: "
                   + ", ".join(f"{m}={','.join(v)}" for m, v in DEFAULT_LRS.items()) + ")")
    p.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale (default: %(default)g)")
    p.add_argument("--directions", type=int, default=8, help="FZOO's N (default: %(default)s)")
    p.add_argument("--horizon", type=int, default=10, help="AdaMeZO's K (default: %(default)s)")
    p.add_argument("--smooth", type=float, default=0.1, help="moving-average width as a fraction of the "
                   "budget (default: %(default)s)")
    p.add_argument("--probes", type=int, default=20, help="probe-loss points per run (default: %(default)s)")
    p.add_argument("--probe-size", type=int, default=64, help="training examples in the probe set (default: "
                   "%(default)s)")
    p.add_argument("--n-test", type=int, help="test examples (default: the task's)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=Path("runs/convergence.json"), help="every number (default: "
                   "%(default)s)")
    p.add_argument("--plot", type=Path, default=Path("runs/convergence.png"),
                   help="the curves (default: %(default)s)")
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
