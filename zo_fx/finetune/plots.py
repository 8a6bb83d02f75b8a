"""What a finished job shows: ``curves.png`` (loss and accuracy against forward passes) and the summary table.

Both read only ``metrics.json``'s content, so a run's report can be redrawn from its
folder. matplotlib is imported when a plot is drawn, not when the CLI starts.
"""

from __future__ import annotations

import math
from pathlib import Path

from zo_fx.files import atomic_path


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` finite values (skipped steps' NaNs are left out)."""
    out, kept = [], []
    for v in values:
        if math.isfinite(v):
            kept.append(v)
        kept = kept[-window:]
        out.append(sum(kept) / len(kept) if kept else float("nan"))
    return out


def plot_curves(metrics: dict, path: Path) -> None:
    """Training loss and validation accuracy against forward passes, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history, evals = metrics["history"], metrics["evals"]
    s = metrics["settings"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    x = [h["forward_passes"] for h in history]
    y = [h["loss"] for h in history]
    ax_loss.plot(x, y, color="tab:blue", alpha=0.3, lw=1, label="per step")
    window = max(1, len(y) // 8)
    ax_loss.plot(x, moving_average(y, window), color="tab:blue", lw=2,
                 label=f"moving average ({window} steps)")
    reward = metrics["task"].get("metric") == "reward"
    ax_loss.set(xlabel="forward passes", ylabel="-reward (training loss)" if reward else "training loss",
                title="training loss")
    ax_loss.legend()
    metric = metrics["task"].get("metric", "accuracy")
    val = [e for e in evals if e["split"] == "validation"]
    ax_acc.plot([e["forward_passes"] for e in val], [math.nan if e.get(metric) is None else e[metric]
                                                     for e in val], "o-", color="tab:orange", label="validation")
    for phase, style in (("zero_shot", ":"), ("final", "--")):
        test = [e for e in evals if e["split"] == "test" and e["phase"] == phase]
        if test and test[-1].get(metric) is not None:
            ax_acc.axhline(test[-1][metric], color="tab:green", ls=style,
                           label=f"test, {phase.replace('_', '-')}: {test[-1][metric]:.3f}")
    ax_acc.set(xlabel="forward passes", ylabel=f"mean {metric}" if metric == "reward" else metric, title=metric)
    ax_acc.legend()
    fig.suptitle(f"{s['method']} on {metrics['task']['name']} ({s['model']}, peft={s['peft']}, "
                 f"lr={s['lr']:g}, B={s['batch_size']})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summary_table(metrics: dict, out: Path) -> str:
    """Zero-shot vs fine-tuned accuracy and loss, the run's cost, and where its outputs are."""
    f = metrics["final"]
    rows = [("", "zero-shot", "fine-tuned")]
    keys = tuple(metrics["task"].get("metric_keys", ("accuracy", "loss")))
    for split in ("validation", "test"):
        for key in keys:
            zs, ft = f["zero_shot"][split].get(key), f["fine_tuned"][split].get(key)
            rows.append((f"{split} {key}", _number(zs), _number(ft)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows]
    for phase in ("zero_shot", "fine_tuned"):
        for split in ("validation", "test"):
            bad = f[phase][split].get("non_finite")
            if bad:
                lines.append(f"NOT AVAILABLE: {phase.replace('_', '-')} {split} {' and '.join(keys)} (the model's "
                             f"outputs are NaN or inf on {bad} of {f[phase][split]['n']} examples)")
    s = metrics["settings"]
    lines.append(f"{s['method']}: {f['steps']} steps, {f['forward_passes']:,} forward passes, "
                 f"{f['skipped_steps']} skipped, {f['train_seconds']:.1f} s training, "
                 f"{f['wall_seconds']:.1f} s wall")
    trajectory = "" if s["method"] == "adam" else " trajectory.json,"
    lines.append(f"outputs in {out}: metrics.json,{trajectory} model.safetensors, curves.png, the model folder")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
