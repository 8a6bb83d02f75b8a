"""A short real run of each optimizer on SmolLM2-135M-Instruct and VADER word sentiment.

Prints, per optimizer, the training loss at the first step, the mean over the last five
of ``--steps`` steps, and seconds per step:

    python examples/real_run.py --steps 50 --threads 1
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from zo_fx.compile import zo_compile
from zo_fx.losses import CandidateClassificationLoss
from zo_fx.models import load_smollm2
from zo_fx.optim.registry import build_optimizer
from zo_fx.tasks import get_task

# The lrs of the run in benchmarks/results/real_run_smollm2.json. The CLI has since moved MeZO's full
# fine-tuning default to 1e-4 (zo_fx.finetune.DEFAULT_LR, from a later sweep).
LRS = {"fzoo": 3e-3, "mezo": 1e-5, "adamezo": 1e-6}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--methods", default="fzoo,mezo,adamezo")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    task = get_task("vader")
    loss = CandidateClassificationLoss(task.label_token_ids(tokenizer))
    results = {}
    for method in args.methods.split(","):
        model.load_state_dict(base)
        cursor = task.cursor(args.batch_size, seed=0)
        batches = [task.encode(tokenizer, cursor.next_batch(), max_length=32) for _ in range(args.steps)]
        zm = zo_compile(model, batches[0], loss=loss)
        opt = build_optimizer(method, zm, lr=LRS[method])
        losses, seconds = [], []
        for batch in tqdm(batches, desc=method):
            info = opt.step(batch)
            losses.append(info.loss)
            seconds.append(info.seconds)
        results[method] = {"loss_first": losses[0], "loss_last5": sum(losses[-5:]) / 5, "lr": LRS[method],
                           "s_per_step": sum(seconds[1:]) / max(1, len(seconds) - 1), "losses": losses}
        print(f"{method}: loss {losses[0]:.4f} at step 1, {results[method]['loss_last5']:.4f} mean of steps "
              f"{args.steps - 4}-{args.steps}; {results[method]['s_per_step']:.2f} s/step", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
