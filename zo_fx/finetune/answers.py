"""A fine-tuning job on an answer task (``zo-fx finetune --task qa.jsonl`` or ``--task SQuAD --data-dir ...``).

As MeZO and FZOO run SQuAD and DROP: the training loss is the per-example cross-entropy of the
first gold answer after the prompt (prompt and padding masked), so any method works, Adam
included; the evaluations decode the validation and test prompts greedily with the unperturbed
model and report exact match and token F1 against every accepted answer (SQuAD's normalisation).
"""

from __future__ import annotations

from pathlib import Path

from zo_fx.finetune.config import FinetuneConfig, FinetuneError
from zo_fx.finetune.job import FinetuneJob
from zo_fx.finetune.optimizer import build_optimizer
from zo_fx.finetune.reward import RewardJob, checked_splits
from zo_fx.losses import causal_lm_loss
from zo_fx.optim.reward import RewardObjective
from zo_fx.rewards import exact_match, token_f1
from zo_fx.tasks import load_generation_task
from zo_fx.tasks.answers import (
    answers_from_generation_task,
    answers_from_jsonl,
    encode_answers,
    is_answer_file,
    with_answer_demonstrations,
)
from zo_fx.tasks.reward_task import RewardTask

#: the answers' metrics, in the order the summary shows them
METRICS = ("exact_match", "f1")


def is_answer_task(cfg: FinetuneConfig) -> bool:
    """A paper generation task (SQuAD, DROP, ReCoRD), or a jsonl of answer rows given without label words."""
    from zo_fx.tasks.superglue import generation_task_names

    if cfg.task.lower() in {n.lower() for n in generation_task_names()}:
        return True
    return cfg.label_words is None and Path(cfg.task).exists() and is_answer_file(cfg.task)


def build_answer_task(cfg: FinetuneConfig) -> RewardTask:
    try:
        if Path(cfg.task).exists():
            task = answers_from_jsonl(cfg.task)
        else:
            sizes = {k: v for k, v in (("n_train", cfg.n_train), ("n_val", cfg.n_val), ("n_test", cfg.n_test))
                     if v is not None}
            task = answers_from_generation_task(load_generation_task(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed,
                                                                     **sizes))
        return checked_splits(task.subsample({"train": cfg.n_train, "validation": cfg.n_val, "test": cfg.n_test}),
                              cfg)
    except (ValueError, OSError, KeyError, ImportError) as err:
        raise FinetuneError(f"task {cfg.task!r}: {err}") from None


class AnswerJob(RewardJob):
    """Cross-entropy of the gold answer to train, greedy decoding with exact match and F1 to evaluate."""

    def build_task(self, cfg: FinetuneConfig) -> RewardTask:
        task = build_answer_task(cfg)
        try:
            return with_answer_demonstrations(task, cfg.demonstrations, cfg.seed)
        except ValueError as err:
            raise FinetuneError(f"--demonstrations {cfg.demonstrations}: {err}") from None

    def build_optimizer(self, cfg: FinetuneConfig):
        self.tokenizer.truncation_side = "left"
        self.model.config.use_cache = True
        self.loss = causal_lm_loss
        self.greedy = RewardObjective(self.tokenizer, exact_match, max_new_tokens=cfg.max_new_tokens)
        example = self.encode(self.task.train[:cfg.batch_size])
        optimizer = build_optimizer(cfg, self.model, self.loss, example, self.out)
        self.zm = getattr(optimizer, "zm", None)
        return optimizer

    def encode(self, examples: list[dict]) -> dict:
        return encode_answers(self.tokenizer, examples, self.cfg.max_length)

    def encode_prompts(self, examples: list[dict]) -> dict:
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            return super().encode(examples)
        finally:
            self.tokenizer.padding_side = side

    def step(self, batch: dict):
        return self.optimizer.step(batch)

    def compile_phase(self) -> None:
        FinetuneJob.compile_phase(self)

    def score(self, split: str, desc: str) -> dict:
        if self.zm is None:  # the Adam baseline: a compiled module only to decode with
            from zo_fx.compile import zo_compile

            example = self.encode(self.task.split(split)[:2])
            self.zm = zo_compile(self.model, {k: v for k, v in example.items() if k != "labels"})
        em, f1, non_finite = [], [], 0
        for chunk, losses, seen in self.greedy_batches(split, desc):
            em += (-losses).tolist()  # the greedy objective's one reward is exact match
            f1 += token_f1(seen["completions"][0], answers=[e["answers"] for e in chunk])
            non_finite += seen["non_finite_outputs"]
        n = len(em)
        if non_finite:
            return {"split": split, "exact_match": None, "f1": None, "n": n, "non_finite": non_finite}
        return {"split": split, "exact_match": sum(em) / n, "f1": sum(f1) / n, "n": n, "non_finite": 0}

    def task_record(self) -> dict:
        return {"name": self.task.name, "description": self.task.description, "metric": "exact_match",
                "metric_keys": list(METRICS), "max_new_tokens": self.cfg.max_new_tokens,
                "sizes": {s: len(getattr(self.task, s)) for s in ("train", "validation", "test")}}

