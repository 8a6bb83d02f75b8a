"""A fine-tuning job whose objective is a reward on generated text (``zo-fx finetune --task countdown``).

:class:`RewardJob` is :class:`~zo_fx.finetune.job.FinetuneJob` with the task-specific parts
replaced: the task is a set of prompts with reward columns (Countdown, arithmetic, or a jsonl
with ``--reward``), a step is ``opt.step(batch, objective=RewardObjective(...))`` (the step's
groups decode together, the rewards' negative is the loss), and an evaluation decodes the
validation or test prompts greedily with the unperturbed model and reports the mean reward.
Everything else (locking, checkpoints, exact resume, SIGTERM, the outputs) is the job's own.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zo_fx.compile import zo_compile
from zo_fx.finetune.config import FinetuneConfig, FinetuneError
from zo_fx.finetune.job import FinetuneJob
from zo_fx.finetune.model import is_masked_lm
from zo_fx.finetune.optimizer import optimizer_of
from zo_fx.optim.reward import RewardObjective
from zo_fx.passes.capture import ExportFailedError
from zo_fx.rewards import resolve
from zo_fx.streams.table import GroupTable
from zo_fx.tasks.countdown import REWARD_TASKS, SPLIT_SIZES
from zo_fx.tasks.reward_task import RewardTask, prompts_from_jsonl

#: prompts decoded together in an evaluation
EVAL_BATCH = 16
#: validation and test prompts of a built-in reward task unless --n-val / --n-test say otherwise
DEFAULT_EVAL_PROMPTS = 64


def build_reward_task(cfg: FinetuneConfig) -> RewardTask:
    """The reward task of ``cfg``: a built-in one (its own rewards unless --reward names others), or a jsonl
    file or folder of prompts with --reward."""
    try:
        extra = [resolve(spec) for spec in cfg.reward.split(",")] if cfg.reward else []
    except ValueError as err:
        raise FinetuneError(f"--reward: {err}") from None
    name = cfg.task.lower()
    try:
        if name in REWARD_TASKS:
            task = REWARD_TASKS[name](seed=cfg.seed, sizes=SPLIT_SIZES)
            if extra:
                task.rewards, task.weights = [f for f, _ in extra], [w for _, w in extra]
        else:
            if not Path(cfg.task).exists():
                raise FinetuneError(f"--task {cfg.task!r}: no such file or folder; a reward task is one of "
                                    f"{', '.join(REWARD_TASKS)} or a jsonl of {{\"prompt\": ...}} lines with --reward")
            task = prompts_from_jsonl(cfg.task, [f for f, _ in extra], [w for _, w in extra])
        default_eval = DEFAULT_EVAL_PROMPTS if name in REWARD_TASKS else None
        return checked_splits(task.subsample({"train": cfg.n_train, "validation": cfg.n_val or default_eval,
                                              "test": cfg.n_test or default_eval}), cfg)
    except (ValueError, OSError) as err:
        raise FinetuneError(f"task {cfg.task!r}: {err}") from None


def checked_splits(task: RewardTask, cfg: FinetuneConfig) -> RewardTask:
    """``task`` with every split non-empty and enough training examples for one batch, or a FinetuneError."""
    for split in ("train", "validation", "test"):
        task.split(split)  # raises ValueError naming an empty split
    if len(task.train) < cfg.batch_size:
        raise FinetuneError(f"task {task.name!r} has {len(task.train)} training examples, fewer than --batch-size "
                            f"{cfg.batch_size}; lower --batch-size or give more data")
    return task


class RewardJob(FinetuneJob):
    """A job that trains on rewards of generated completions; see the module docstring."""

    def build_task(self, cfg: FinetuneConfig) -> RewardTask:
        if cfg.method == "adam":
            raise FinetuneError("--method adam needs a differentiable loss; a reward on generated text is not one. "
                                "Use --method fzoo, mezo or adamezo")
        if cfg.demonstrations:
            raise FinetuneError(f"--demonstrations needs solved examples; the prompts of reward task {cfg.task!r} "
                                "have no answers to show. Use it with a classification or answer task")
        return build_reward_task(cfg)

    def check_before_load(self, cfg: FinetuneConfig) -> None:
        pass

    def fit_task(self, task):
        if is_masked_lm(self.model):
            raise FinetuneError(f"{type(self.model).__name__} is a masked LM: it fills in a mask token and does not "
                                "generate text. Train it on a classification task (--label-words, --template), or "
                                "use a causal LM for rewards and answers")
        return task

    def build_optimizer(self, cfg: FinetuneConfig):
        self.tokenizer.padding_side = "left"  # completions are appended at the end
        self.tokenizer.truncation_side = "left"  # a long prompt keeps its end, where the question is
        self.model.config.use_cache = True
        self.objective = RewardObjective(self.tokenizer, self.task.rewards, self.task.weights,
                                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, **cfg.generation_args())
        self.greedy = RewardObjective(self.tokenizer, self.task.rewards, self.task.weights,
                                      max_new_tokens=cfg.max_new_tokens)
        example = self.inputs(self.encode(self.task.train[:cfg.batch_size]))
        try:
            zm = zo_compile(self.model, example)
        except ExportFailedError as err:
            raise FinetuneError(f"zo_compile could not prepare {type(self.model).__name__}: {err}") from None
        self.zm = zm
        return optimizer_of(cfg, zm)

    @staticmethod
    def inputs(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def encode(self, examples: list[dict]) -> dict:
        prompts = [e["prompt"] for e in examples]
        tokens = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.cfg.max_length)
        columns = {k: [e.get(k) for e in examples] for k in examples[0] if k != "prompt"}
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "prompts": prompts,
                **columns}

    def encode_prompts(self, examples: list[dict]) -> dict:
        """The prompts alone, left-padded, for decoding (a reward task trains on these too)."""
        return self.encode(examples)

    def step(self, batch: dict):
        return self.optimizer.step(batch, objective=self.objective)

    def compile_phase(self) -> None:
        """Capture the decoding graphs (prefill, one-token decode) before the step bar starts."""
        with tqdm(total=1, desc="compile", unit="graph", dynamic_ncols=True) as bar:
            batch = self.encode(self.task.train[:self.cfg.batch_size])
            self.zm.generate(self.inputs(batch), self.optimizer.table(), 2)
            bar.update(1)

    @torch.no_grad()
    def greedy_batches(self, split: str, desc: str):
        """(examples, ``-`` their rewards, what the objective saw) per batch of ``split``: greedy completions of
        the unperturbed model, scored by ``self.greedy``."""
        examples = self.task.split(split)
        table = GroupTable([0], [0.0], self.cfg.eps)  # coefficient 0: the direction kind plays no part
        for lo in tqdm(range(0, len(examples), EVAL_BATCH), desc=desc, unit="batch", leave=False,
                       dynamic_ncols=True):
            chunk = examples[lo:lo + EVAL_BATCH]
            losses = self.greedy(self.zm, self.encode_prompts(chunk), table, 0)
            yield chunk, losses[0], self.greedy.last

    def score(self, split: str, desc: str) -> dict:
        """Mean reward of greedy completions of ``split`` by the unperturbed model; None where outputs were NaN."""
        rewards, non_finite = [], 0
        for _, losses, seen in self.greedy_batches(split, desc):
            rewards += (-losses).tolist()
            non_finite += seen["non_finite_outputs"]
        scored = [r for r in rewards if math.isfinite(r)]
        n = len(rewards)
        if non_finite:
            return {"split": split, "reward": None, "n": n, "non_finite": non_finite, "failed": n - len(scored)}
        return {"split": split, "reward": sum(scored) / len(scored) if scored else None, "n": n, "non_finite": 0,
                "failed": n - len(scored), "loss": -(sum(scored) / len(scored)) if scored else None}

    def task_record(self) -> dict:
        return {"name": self.task.name, "description": self.task.description, "metric": "reward",
                "metric_keys": ["reward"],
                "rewards": [getattr(f, "__name__", "reward") for f in self.task.rewards],
                "weights": self.task.weights, "max_new_tokens": self.cfg.max_new_tokens,
                "sizes": {s: len(getattr(self.task, s)) for s in ("train", "validation", "test")}}
