"""Rewards as objectives: the step's G groups generate completions together, rewards score them, the loss is -reward.

``opt.step(batch, objective=RewardObjective(tokenizer, reward_funcs=[...]))`` runs one
reward step with any method: ``zm.generate`` decodes the batch's prompts for every group of
the step's table in one batched pass (group g with exactly its perturbation), the completions
are scored by TRL-style reward functions (:mod:`zo_fx.rewards`), and ``-reward`` is the
``[G, B]`` loss table the method turns into its update (FZOO's normalisation by the spread
makes the reward's scale irrelevant). An example whose reward is missing in any group is left
out of the step in every group (:mod:`zo_fx.optim.means`); a step where every example failed
is skipped with the weights untouched.

Sampling (``do_sample=True``) draws from a generator seeded by (objective seed, step), so a run
resumed from a checkpoint samples exactly what the uninterrupted run did.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence

import torch

from zo_fx.rewards import RewardFn, score
from zo_fx.streams.table import GroupTable

#: batch keys that are model inputs or the prompts themselves, not columns for the reward functions
MODEL_KEYS = ("input_ids", "attention_mask", "prompts", "prompt")


def sampling_seed(seed: int, step: int) -> int:
    digest = hashlib.blake2b(f"zo_fx:sample:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RewardObjective:
    """Generate with the step's groups, score with ``reward_funcs`` (weighted), hand ``-reward`` to the optimizer.

    Args:
        tokenizer: decodes the completions (special tokens skipped).
        reward_funcs: one or several TRL-style reward functions.
        reward_weights: one weight per function (default 1.0 each), as TRL's ``reward_weights``.
        max_new_tokens: completion length limit.
        seed: seeds sampling (with the step number).
        generation_args: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ... as ``zm.generate`` takes them.
    """

    def __init__(self, tokenizer, reward_funcs: RewardFn | Sequence[RewardFn], reward_weights=None, *,
                 max_new_tokens: int = 32, seed: int = 0, **generation_args):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs or not all(callable(f) for f in funcs):
            raise TypeError("reward_funcs must be a callable or a list of callables "
                            "(reward(prompts=..., completions=..., **columns) -> list[float | None])")
        weights = [1.0] * len(funcs) if reward_weights is None else [float(w) for w in reward_weights]
        if len(weights) != len(funcs) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights needs one finite weight per reward function ({len(funcs)}); "
                             f"got {reward_weights!r}")
        self.tokenizer = tokenizer
        self.funcs, self.weights = funcs, weights
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.generation_args = generation_args
        #: what the last call saw: rewards per group, completion lengths, failures, timing
        self.last: dict = {}

    def completions(self, zm, batch: dict, table: GroupTable, step: int) -> tuple[list[list[str]], torch.Tensor]:
        """Each group's decoded completions, and their lengths in tokens (``[G, B]``)."""
        seed = sampling_seed(self.seed, step) if self.generation_args.get("do_sample") else None
        tokens = zm.generate(batch, table, self.max_new_tokens, seed=seed, **self.generation_args)
        encoder_decoder = zm.decoder().encoder_decoder
        new = tokens[:, :, 1:] if encoder_decoder else tokens[:, :, batch["input_ids"].shape[1]:]
        settings_pad = {self.tokenizer.pad_token_id} if self.tokenizer.pad_token_id is not None else set()
        eos = self.tokenizer.eos_token_id
        lengths = torch.zeros(new.shape[:2], dtype=torch.long)
        texts = []
        for g in range(new.shape[0]):
            row = []
            for b in range(new.shape[1]):
                ids = new[g, b].tolist()
                if eos is not None and eos in ids:
                    ids = ids[: ids.index(eos) + 1]
                lengths[g, b] = len([t for t in ids if t not in settings_pad or t == eos])
                row.append(self.tokenizer.decode(ids, skip_special_tokens=True))
            texts.append(row)
        return texts, lengths

    def __call__(self, zm, batch: dict, table: GroupTable, step: int) -> torch.Tensor:
        t0 = time.perf_counter()
        texts, lengths = self.completions(zm, batch, table, step)
        broken = zm.decoder().last_nonfinite
        t1 = time.perf_counter()
        prompts = batch.get("prompts", batch.get("prompt"))
        if prompts is None:
            prompts = self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        columns = {k: v for k, v in batch.items() if k not in MODEL_KEYS and not isinstance(v, torch.Tensor)}
        rewards, failures, per_function = [], [], []
        for group in texts:
            scored = score(self.funcs, self.weights, list(prompts), group, columns)
            rewards.append(scored.rewards)
            failures += scored.failures
            per_function.append(scored.per_function)
        t2 = time.perf_counter()
        table_r = torch.tensor(rewards, dtype=torch.float64)
        if broken is not None and bool(broken.any()):  # never a reward from text decoded from NaN logits
            table_r[broken.cpu()] = math.nan
        finite = torch.isfinite(table_r)
        self.last = {
            "rewards": [float(r[f].mean()) if f.any() else math.nan for r, f in zip(table_r, finite)],
            "reward_functions": per_function,
            "completion_lengths": lengths.double().mean(1).tolist(),
            "failed_examples": int((~finite.all(0)).sum()),
            "non_finite_outputs": int(broken.sum()) if broken is not None else 0,
            "failures": sorted(set(failures)),
            "timing": {"generate_s": t1 - t0, "score_s": t2 - t1},
            "completions": texts,
        }
        return -table_r
