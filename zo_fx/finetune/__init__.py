"""A fine-tuning job: model + task in, trained weights, metrics, trajectory and curves out.

This is what ``zo-fx finetune`` runs (``zo_fx/cli.py`` only parses arguments into a
:class:`FinetuneConfig`). One job:

1. builds the task (fast, so bad data fails before a 20 s model load), then the model and
   tokenizer, optionally wrapped in a PEFT adapter;
2. scores each example as MeZO's ``train_as_classification`` does: cross-entropy over the
   label words' logits at the last prompt token (:class:`zo_fx.CandidateClassificationLoss`);
3. evaluates zero-shot accuracy and loss on validation and test;
4. trains with FZOO, MeZO or AdaMeZO over ``zo_compile``'s graph, or with AdamW and
   backprop as a baseline, evaluating on validation every ``eval_every`` steps and writing
   a crash-safe checkpoint (weights, optimizer state and trajectory, data position, metrics)
   every ``checkpoint_every`` steps; ``resume=True`` continues from the newest one exactly;
5. evaluates the result and writes ``metrics.json``, ``trajectory.json`` (ZO methods),
   ``model.safetensors`` (the trainable parameters) and ``curves.png``.

User errors (unknown task or model, bad label words, empty split, ...) raise
:class:`FinetuneError` with a message that says what to do; the CLI prints it without a
traceback. They are raised before anything is written, so a mistake loses nothing.

One module per concern: ``config`` (settings, defaults, errors), ``labels`` (``--label-words``),
``task``, ``model`` (model, tokenizer, PEFT), ``loss``, ``evaluate``, ``adam`` (the backprop
baseline), ``optimizer``, ``resume`` (run folder, checkpoints), ``plots`` (curves and summary)
and ``job`` (the run itself).

Example::

    from zo_fx.finetune import FinetuneConfig, run
    result = run(FinetuneConfig(steps=20, output_dir="runs/demo"))
    result["final"]["fine_tuned"]["test"]["accuracy"]
"""

from zo_fx.finetune.adam import AdamBaseline
from zo_fx.finetune.config import (
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
    forward_passes_per_step,
    linear_decay,
)
from zo_fx.finetune.evaluation import evaluate
from zo_fx.finetune.job import FinetuneJob, run
from zo_fx.finetune.loss import build_loss
from zo_fx.finetune.model import apply_peft, load_model_and_tokenizer
from zo_fx.finetune.optimizer import zo_optimizer
from zo_fx.finetune.plots import moving_average
from zo_fx.finetune.task import build_task

__all__ = [
    "DEFAULT_EVALS", "DEFAULT_LR", "DEFAULT_PEFT_LR", "DEFAULT_STEPS", "DIRECTION_KINDS", "DTYPES", "LR_SCHEDULES",
    "METHODS", "PEFTS", "AdamBaseline", "FinetuneConfig", "FinetuneError", "FinetuneJob", "apply_peft", "build_loss",
    "build_task", "evaluate", "forward_passes_per_step", "linear_decay", "load_model_and_tokenizer",
    "moving_average", "run", "zo_optimizer",
]
