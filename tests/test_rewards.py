"""Rewards over generated text: the built-in scorers on hand-checked strings, TRL's calling convention,
failures dropped per example, and a reward run that learns."""

import math
import random
import sys
import types

import pytest
import torch

import zo_fx
from zo_fx import rewards as R

# ---- built-in scorers on hand-checked strings ---------------------------------------------------------


def test_squad_normalisation_and_exact_match():
    assert R.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert R.normalize_answer("an apple, a pear") == "apple pear"
    got = R.exact_match(["Paris.", "the Louvre", "<answer> 1889 </answer> because", "London"],
                        answers=[["paris"], ["Louvre museum", "Louvre"], ["1889"], ["Paris"]])
    assert got == [1.0, 1.0, 1.0, 0.0]


def test_token_f1_is_squads():
    assert R.f1_score("the cat sat", "cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3))
    assert R.f1_score("", "") == 1.0 and R.f1_score("x", "") == 0.0 and R.f1_score("dog", "cat") == 0.0
    assert R.token_f1(["big red dog"], answers=[["red dog", "a cat"]]) == [pytest.approx(0.8)]


def test_number_match_reads_the_last_number():
    completions = ["so 3 + 4 = 7", "The answer is 1,234.", "-2.5", "no number", "<answer>42</answer> not 41"]
    assert R.number_match(completions, answer=["7", "1234", "-2.50", "3", "42"]) == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_format_and_regex_rewards():
    assert R.answer_format(["<answer>3*4</answer>", "<answer> </answer>", "3*4"]) == [1.0, 0.0, 0.0]
    assert R.regex_reward(r"^\d+$")(["12", "a12"]) == [1.0, 0.0]


def test_reward_specs_resolve_built_ins_weights_and_user_functions(monkeypatch):
    assert R.resolve("format:0.1") == (R.answer_format, 0.1)
    assert R.resolve("exact_match") == (R.exact_match, 1.0)
    user = types.ModuleType("my_rewards")
    user.length = lambda completions, **kw: [float(len(c)) for c in completions]
    monkeypatch.setitem(sys.modules, "my_rewards", user)
    fn, weight = R.resolve("my_rewards:length:2")
    assert fn is user.length and weight == 2.0
    for bad in ("nope", "my_rewards:missing", "a:b:c:d"):
        with pytest.raises(ValueError):
            R.resolve(bad)


def test_score_calls_trl_style_and_drops_what_fails():
    seen = {}

    def trl_style(prompts, completions, answer, **kwargs):  # as a GRPOTrainer reward is written
        seen.update(prompts=prompts, answer=answer, extra=kwargs)
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

    def sometimes(completions, **kwargs):
        return [None, 0.5, math.nan]

    scores = R.score([trl_style, sometimes], [1.0, 2.0], ["p0", "p1", "p2"], ["a", "b", "x"],
                     {"answer": ["a", "b", "c"], "id": [0, 1, 2]})
    assert seen == {"prompts": ["p0", "p1", "p2"], "answer": ["a", "b", "c"], "extra": {"id": [0, 1, 2]}}
    assert math.isnan(scores.rewards[0]) and scores.rewards[1] == 2.0 and math.isnan(scores.rewards[2])
    assert any("sometimes" in f and "2 of 3" in f for f in scores.failures)

    def broken(completions, **kwargs):
        raise RuntimeError("grader down")

    scores = R.score([broken], [1.0], ["p"], ["c"], {})
    assert math.isnan(scores.rewards[0]) and "grader down" in scores.failures[0]


# ---- reward steps on a tiny model ---------------------------------------------------------------------

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "great", "terrible", "ok", "the", "movie", "was", "a", "film", "plot",
         "actor", "bad", "good", "nice", "dull", "long", "short"]


@pytest.fixture(scope="module")
def tiny():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", padding_side="left")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 3
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS[6:]) for _ in range(rng.randint(2, 5))) for _ in range(64)]
    zm = zo_fx.zo_compile(model, dict(tokenizer(prompts[:4], return_tensors="pt", padding=True)))
    initial = {n: p.detach().clone() for n, p in zm.trainable_parameters().items()}
    return zm, tokenizer, prompts, initial


def _fresh(zm, initial):
    """The compiled model back at its initial weights (the tests share one compilation)."""
    with torch.no_grad():
        for n, p in zm.trainable_parameters().items():
            p.copy_(initial[n])
    return zm


def _batch(tokenizer, prompts, **columns) -> dict:
    return {**dict(tokenizer(prompts, return_tensors="pt", padding=True)), "prompts": prompts, **columns}


def share_of_great(completions, **kwargs):
    """The task: say "great" (partial credit per word of the 4-token completion)."""
    return [sum(w == "great" for w in c.split()) / 4 for c in completions]


def _mean_reward(zm, objective, batch) -> float:
    objective(zm, batch, zo_fx.GroupTable([0], [0.0], 1e-3), 0)
    return objective.last["rewards"][0]


def test_a_reward_run_learns_a_task_a_tiny_model_can(tiny):
    """Task: complete random 2-5 word prompts with "great"; tiny Llama (seed 0), FZOO N=8, lr=eps=0.05,
    25 steps of 8 prompts, greedy decoding of 4 tokens; held-out prompts 32-63."""
    zm, tokenizer, prompts, initial = tiny
    zm = _fresh(zm, initial)
    objective = zo_fx.RewardObjective(tokenizer, share_of_great, max_new_tokens=4)
    held_out = _batch(tokenizer, prompts[32:])
    before = _mean_reward(zm, objective, held_out)
    opt = zo_fx.FZOO(zm, lr=0.05, eps=0.05, n_directions=8)
    for step in range(25):
        chunk = prompts[(step * 8) % 32:(step * 8) % 32 + 8]
        info = opt.step(_batch(tokenizer, chunk), objective=objective)
        assert {"rewards", "completion_lengths", "failed_examples"} <= set(info.objective)
        assert len(info.objective["rewards"]) == 9 and "generate_s" in info.timing and "score_s" in info.timing
    after = _mean_reward(zm, objective, held_out)
    assert after >= before + 0.2, (before, after)


def test_a_failing_reward_drops_its_examples_and_an_all_failing_step_is_skipped(tiny):
    zm, tokenizer, prompts, initial = tiny
    zm = _fresh(zm, initial)

    def flaky(completions, idx, **kwargs):
        return [None if i == 1 else float(len(c)) for i, c in zip(idx, completions)]

    opt = zo_fx.FZOO(zm, lr=0.05, eps=0.05, n_directions=4)
    objective = zo_fx.RewardObjective(tokenizer, [share_of_great, flaky], [1.0, 0.01], max_new_tokens=4)
    info = opt.step(_batch(tokenizer, prompts[:4], idx=[0, 1, 2, 3]), objective=objective)
    assert info.dropped_examples == [1] and info.objective["failed_examples"] == 1
    assert any("flaky" in f for f in info.objective["failures"])

    def down(completions, **kwargs):
        raise ConnectionError("grader unreachable")

    before = {n: p.detach().clone() for n, p in zm.trainable_parameters().items()}
    info = opt.step(_batch(tokenizer, prompts[:4]), objective=zo_fx.RewardObjective(tokenizer, down))
    assert info.skipped and "every example" in info.reason
    assert all(torch.equal(before[n], p) for n, p in zm.trainable_parameters().items())


def test_sampled_reward_steps_replay_exactly(tiny):
    """The sampling stream is a function of (objective seed, step): two runs give the same weights."""
    zm, tokenizer, prompts, initial = tiny
    finals = []
    for _ in range(2):
        zm = _fresh(zm, initial)
        opt = zo_fx.FZOO(zm, lr=0.05, eps=0.05, n_directions=3)
        objective = zo_fx.RewardObjective(tokenizer, share_of_great, max_new_tokens=3, do_sample=True,
                                          temperature=1.0, seed=11)
        for step in range(3):
            opt.step(_batch(tokenizer, prompts[step * 4:step * 4 + 4]), objective=objective)
        finals.append({n: p.detach().clone() for n, p in zm.trainable_parameters().items()})
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])
    assert not all(torch.equal(finals[0][n], initial[n]) for n in initial), "the steps moved the weights"


def test_zo_trainer_takes_reward_funcs_as_grpo_trainer_does(tiny, tmp_path):
    from transformers import TrainingArguments

    zm, tokenizer, prompts, initial = tiny
    model = _fresh(zm, initial).model
    data = [{"prompt": p, "idx": i} for i, p in enumerate(prompts[:16])]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.05,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=3,
                             disable_tqdm=True)
    seen = []

    def great_with_columns(prompts, completions, idx, **kwargs):
        seen.append(list(idx))
        return [g + 0.01 * len(c) for g, c in zip(share_of_great(completions), completions)]

    trainer = zo_fx.ZOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                              reward_funcs=great_with_columns, max_new_tokens=3, zo_method="fzoo",
                              zo_kwargs={"n_directions": 3, "eps": 0.05})
    trainer.train()
    info = trainer.last_step_info
    assert not info.skipped and len(info.objective["rewards"]) == 4
    assert seen and all(len(s) == 4 for s in seen), "the dataset's other fields reach the reward as columns"
    assert len([h for h in trainer.state.log_history if "reward" in h]) == 2
    assert not all(torch.equal(p, initial[n]) for n, p in zm.trainable_parameters().items())
    with pytest.raises(ValueError, match="processing_class"):
        zo_fx.ZOTrainer(model=model, args=args, train_dataset=data, reward_funcs=share_of_great)


def test_no_reward_is_computed_from_text_decoded_from_nan_logits(tiny):
    zm, tokenizer, prompts, initial = tiny
    zm = _fresh(zm, initial)
    norm = next(p for n, p in zm.trainable_parameters().items() if n.endswith("norm.weight"))
    objective = zo_fx.RewardObjective(tokenizer, share_of_great, max_new_tokens=3)
    try:
        with torch.no_grad():
            norm.fill_(math.nan)
        losses = objective(zm, _batch(tokenizer, prompts[:4]), zo_fx.GroupTable([0, 5], [0.0, 1.0], 1e-3), 0)
    finally:
        _fresh(zm, initial)
    assert bool(losses.isnan().all()), "an argmax over NaN logits picks token 0: its text must earn nothing"
    assert objective.last["non_finite_outputs"] == 8 and objective.last["failed_examples"] == 4
