"""``ZOTrainer``: fine-tune with zo_fx optimizers through the Hugging Face ``Trainer``.

The Trainer keeps doing what it is good at (data loading, ``TrainingArguments``, LR
schedules, logging, evaluation, saving); only the training step changes: instead of
forward + backward, one zo_fx step evaluates the G perturbed copies in one batched
pass and applies the fused update. The Trainer's optimizer is the zo optimizer's
one-tensor ``torch_optimizer``, so its LR scheduler drives our learning rate and its
``optimizer.step()`` is a no-op.

Set ``remove_unused_columns=False`` when the loss reads keys the model does not take
(e.g. ``class_labels`` for :class:`CandidateClassificationLoss`).

Rewards, as TRL's ``GRPOTrainer`` takes them: ``reward_funcs=`` (one function or a list, called
``reward(prompts=..., completions=..., **columns)``), ``reward_weights=``, ``max_new_tokens=`` and
``generation_kwargs=``; the dataset's examples hold a ``"prompt"`` and the columns the rewards
read, and the tokenizer comes as ``processing_class``. Each step then decodes the batch's prompts
with every perturbed model of the step and trains on ``-reward``
(:class:`~zo_fx.optim.reward.RewardObjective`); the mean reward is logged.

Under ``torchrun`` the script runs unchanged: the Trainer gives each rank its own examples
(a distributed sampler), so the optimizer runs the ``"data"`` strategy on them
(``shard_batch=False``): the group losses of all ranks' examples are combined into one
update that every rank applies, and only rank 0 writes the zo state (the Trainer's own
``should_save``). Pass ``zo_kwargs={"strategy": ...}`` to choose otherwise.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from zo_fx.compile import zo_compile
from zo_fx.optim.distributed import Distributed
from zo_fx.optim.registry import build_optimizer, get_method
from zo_fx.optim.reward import RewardObjective

ZO_STATE = "zo_optimizer.json"
#: the buffers of a stateful method (ZO-SGD momentum, ZO-Adam) beside its JSON state
ZO_BUFFERS = "zo_optimizer_buffers.safetensors"


class PromptCollator:
    """Examples with a ``"prompt"`` -> left-padded ``input_ids``/``attention_mask``, the prompts, and every other
    field as a column (a list) for the reward functions."""

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: list[dict]) -> dict:
        if not examples or any("prompt" not in e for e in examples):
            raise ValueError("reward training needs examples with a 'prompt' field")
        prompts = [e["prompt"] for e in examples]
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            tokens = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                    truncation=self.max_length is not None, max_length=self.max_length)
        finally:
            self.tokenizer.padding_side = side
        columns = {k: [e.get(k) for e in examples] for k in examples[0] if k != "prompt"}
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "prompts": prompts,
                **columns}


class ZOTrainer(Trainer):
    """A ``Trainer`` whose step is a zeroth-order step.

    Args:
        zo_method: "fzoo", "mezo", "adamezo" or "es" (any name of ``zo_fx.METHODS``).
        zo_kwargs: extra arguments of the optimizer (eps, n_directions, horizon, kind, ...);
            the learning rate, weight decay and seed come from ``TrainingArguments``.
        zo_loss: per-example loss ``(outputs, batch) -> Tensor[N]`` (default: from the model class).
        zo_impl: "auto", "torch" or "triton" (see :func:`zo_fx.zo_compile`).
        zo_loss_keys: batch keys only the loss reads (see ``loss_keys`` of :func:`zo_fx.zo_compile`).
        reward_funcs, reward_weights, max_new_tokens, generation_kwargs: train on rewards of generated text
            (see the module docstring); needs ``processing_class`` (the tokenizer).
    """

    def __init__(self, *args, zo_method: str = "fzoo", zo_kwargs: dict | None = None, zo_loss=None,
                 zo_impl: str = "auto", zo_loss_keys=(), reward_funcs=None, reward_weights=None,
                 max_new_tokens: int = 32, generation_kwargs: dict | None = None, **kwargs):
        try:
            get_method(zo_method)  # an unknown name fails here, before the Trainer is built
        except ValueError as err:
            raise ValueError(f"zo_method: {err}") from None
        self.reward_objective = None
        if reward_funcs is not None:
            tokenizer = kwargs.get("processing_class")
            if tokenizer is None:
                raise ValueError("reward_funcs needs processing_class=tokenizer (to encode prompts and decode "
                                 "completions)")
            kwargs.setdefault("data_collator", PromptCollator(tokenizer))
            args_ = kwargs.get("args") or (args[1] if len(args) > 1 else None)
            seed = getattr(args_, "seed", 0)
            self.reward_objective = RewardObjective(tokenizer, reward_funcs, reward_weights,
                                                    max_new_tokens=max_new_tokens, seed=seed,
                                                    **dict(generation_kwargs or {}))
        super().__init__(*args, **kwargs)
        if self.reward_objective is not None and self.args.remove_unused_columns:
            self.args.remove_unused_columns = False  # the prompts and the rewards' columns are not model inputs
        self.zo_method = zo_method
        self.zo_kwargs = dict(zo_kwargs or {})
        self.zo_loss = zo_loss
        self.zo_impl = zo_impl
        self.zo_loss_keys = tuple(zo_loss_keys)
        self.zo_module = None
        self.zo_optimizer = None
        self.last_step_info = None
        self._pending_zo_state = self._pending_zo_buffers = None

    def _build_zo(self, batch: dict) -> None:
        if self.reward_objective is not None:  # the model sees the tensors; prompts and columns go to the rewards
            batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.zo_module = zo_compile(self.model, batch, loss=self.zo_loss, impl=self.zo_impl,
                                     loss_keys=self.zo_loss_keys)
        kwargs = dict(self.zo_kwargs)
        if "strategy" not in kwargs and Distributed.resolve() is not None:  # per-rank batches from the sampler
            kwargs.update(strategy="data", shard_batch=False)
        self.zo_optimizer = build_optimizer(
            self.zo_method, self.zo_module, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
            seed=self.args.seed, **kwargs,
        )
        # share the Trainer's optimizer param group, so its scheduler sets our lr
        self.zo_optimizer.torch_optimizer = self.optimizer
        if self._pending_zo_state is not None:
            state = {**self._pending_zo_state, "torch_optimizer": self.optimizer.state_dict()}
            self.zo_optimizer.load_state_dict(state)
            self.zo_optimizer.load_state_tensors(self._pending_zo_buffers or {})
            self._pending_zo_state = self._pending_zo_buffers = None

    def create_optimizer(self):
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=self.args.learning_rate)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = {k: v for k, v in self._prepare_inputs(inputs).items()}
        if self.zo_optimizer is None:
            self._build_zo(inputs)
        info = self.zo_optimizer.step(inputs, objective=self.reward_objective)
        self.last_step_info = info
        if info.skipped:
            self.log({"zo_skipped": 1.0})
        if info.objective:
            self.log({"reward": info.objective["rewards"][0],
                      "completion_length": sum(info.objective["completion_lengths"]) / len(
                          info.objective["completion_lengths"])})
        return torch.tensor(info.loss if not info.skipped else float("nan")).to(self.args.device)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.zo_optimizer is not None and self.args.should_save:  # rank 0 only under torchrun
            with open(os.path.join(output_dir, ZO_STATE), "w") as f:
                json.dump(self.zo_optimizer.state_dict(), f)
            buffers = self.zo_optimizer.state_tensors()
            if buffers:  # ZO-SGD momentum / ZO-Adam buffers
                save_file({k: v.contiguous() for k, v in buffers.items()}, os.path.join(output_dir, ZO_BUFFERS))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, ZO_STATE)):
            with open(os.path.join(checkpoint, ZO_STATE)) as f:
                self._pending_zo_state = json.load(f)
            buffers = os.path.join(checkpoint, ZO_BUFFERS)
            self._pending_zo_buffers = load_file(buffers) if os.path.exists(buffers) else None
