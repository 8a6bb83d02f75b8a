"""An answer task before and after fine-tuning: exact match and F1 of greedy answers, zero-shot and trained.

The task is a local jsonl folder this script writes from the package's arithmetic generator (two-number
+, -, * questions, seed 0), ``{"prompt": "What is 64 - 72?\\nAnswer: 64 - 72 =", "answers": ["-8"]}``: the
kind of file a user brings. ``zo-fx finetune`` trains on the gold answer's cross-entropy and evaluates
by greedy decoding with the unperturbed model, as MeZO and FZOO run SQuAD and DROP:

    python benchmarks/answers.py --threads 2     # writes benchmarks/results/answers_arithmetic_smollm2.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from generate import cpu_model  # noqa: E402

from zo_fx.cli import main as cli  # noqa: E402
from zo_fx.tasks.countdown import arithmetic_task  # noqa: E402

SIZES = {"train": 400, "validation": 64, "test": 128}


def write_task(folder: Path) -> Path:
    """The arithmetic questions as an answer-task folder (train/validation/test jsonl)."""
    task = arithmetic_task(0, sizes=SIZES)
    folder.mkdir(parents=True, exist_ok=True)
    for split in SIZES:
        rows = [{"prompt": e["prompt"], "answers": [e["answer"]]} for e in getattr(task, split)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--method", default="fzoo")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("runs/answers_benchmark"))
    p.add_argument("--out", default=str(HERE / "results" / "answers_arithmetic_smollm2"))
    args = p.parse_args()
    data = write_task(args.work / "data")
    run = args.work / "run"
    flags = ["finetune", "--task", str(data), "--method", args.method, "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--max-new-tokens", "6", "--max-length", "48",
             "--output-dir", str(run), "--overwrite", *(["--lr", str(args.lr)] if args.lr else []),
             *(["--threads", str(args.threads)] if args.threads else [])]
    t0 = time.perf_counter()
    status = cli(flags)
    wall = time.perf_counter() - t0
    metrics = json.loads((run / "metrics.json").read_text())
    final = metrics["final"]
    rows = {phase: {split: {k: final[phase][split].get(k) for k in ("exact_match", "f1", "n")}
                    for split in ("validation", "test")} for phase in ("zero_shot", "fine_tuned")}
    meta = {"cpu": cpu_model(), "threads": args.threads, "command": "python benchmarks/answers.py " +
            " ".join(sys.argv[1:]), "zo_fx_finetune": " ".join(flags), "wall_s": wall, "status": status,
            "lr": metrics["settings"]["lr"], "sizes": SIZES}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    lines = [f"# Answer task (arithmetic jsonl), SmolLM2-135M, {args.method} {args.steps} steps, "
             f"lr {meta['lr']:g}, B={args.batch_size}", "",
             f"CPU: {meta['cpu']}, {args.threads} threads; `{meta['command']}` ({wall / 60:.1f} min)", "",
             "| split | exact match zero-shot | fine-tuned | F1 zero-shot | fine-tuned |", "|---|---|---|---|---|"]
    for split in ("validation", "test"):
        z, f = rows["zero_shot"][split], rows["fine_tuned"][split]
        lines.append(f"| {split} (n={z['n']}) | {z['exact_match']:.3f} | {f['exact_match']:.3f} | {z['f1']:.3f} | "
                     f"{f['f1']:.3f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
