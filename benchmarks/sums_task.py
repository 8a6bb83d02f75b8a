"""A second classification task for the method comparison, as a user's jsonl file: is this sum right?

Each line is ``{"text": "17 + 25 = 42", "label": "yes"}`` or a wrong total (off by 1 to 10, or
two digits swapped) labelled ``"no"``, half of each, from a seeded generator. Unlike VADER's
sentiment, which a small instruction-tuned model half knows already, checking arithmetic asks
it for something it is poor at zero-shot, so the methods are compared on a task where there is
much to learn. It goes through the job like any user file:

    python benchmarks/sums_task.py runs/tasks/sums.jsonl
    python benchmarks/convergence.py --task runs/tasks/sums.jsonl --label-words yes=Yes,no=No \\
        --template '{text}. Is this sum correct? Answer:'
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LABEL_WORDS = "yes=Yes,no=No"
TEMPLATE = "{text}. Is this sum correct? Answer:"


def examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct sums, alternately right and wrong."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        total, right = a + b, len(rows) % 2 == 0
        if not right:
            digits = str(total)
            swapped = digits[::-1]
            total = int(swapped) if len(digits) > 1 and swapped != digits and rng.random() < 0.3 else (
                total + rng.choice([-1, 1]) * rng.randint(1, 10))
        text = f"{a} + {b} = {total}"
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": "yes" if right else "no"})
    return rows


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="the jsonl file to write")
    p.add_argument("--n", type=int, default=3000, help="examples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text("".join(json.dumps(r) + "\n" for r in examples(args.n, args.seed)))
    print(f"wrote {args.n} examples to {args.path}")
    return args.path


if __name__ == "__main__":
    main()
