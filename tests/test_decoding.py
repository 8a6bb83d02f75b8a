"""``zm.generate``: the G perturbed models decode together, each exactly as its explicitly perturbed copy would.

The reference is Hugging Face ``model.generate`` on the eager model with its weights perturbed in
place (float64), group by group; token for token, left-padded prompts of different lengths, EOS per
sequence.
"""

import functools

import pytest
import torch
from explicit import perturbed_in_place
from model_zoo import VOCAB, tiny_gpt2, tiny_llama, tiny_lora_llama
from zoo_more import tiny_mixtral, tiny_t5

import zo_fx
from zo_fx.decoding import GenerationSettingError
from zo_fx.streams import GroupTable

EOS, PAD = 5, 0
TABLE = GroupTable([0, 11, 12], [0.0, 1.0, 1.0], 0.5)  # eps large enough to change tokens of a tiny model


def left_padded(batch_size=3, seq_len=6, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in zip(range(1, batch_size), (2, 4)):
        mask[row, :pad] = 0
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


@functools.cache
def compiled_family(family: str):
    """One compiled model per family for the whole file (the decoding graphs are captured once)."""
    return compiled(FAMILIES[family], left_padded())


def compiled(make, batch):
    model = make()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    if getattr(model.config, "is_encoder_decoder", False):
        example = {**batch, "decoder_input_ids": batch["input_ids"][:, :3], "labels": batch["input_ids"][:, :3]}
    else:
        example = {**batch, "labels": batch["input_ids"]}
    return model, zo_fx.zo_compile(model, example)


def explicit_generate(model, zm, batch, table, max_new_tokens, **kwargs) -> list[torch.Tensor]:
    """Each group's ``model.generate`` with the weights perturbed in place, then restored."""
    outs = []
    for seed, coef in zip(table.seeds, table.coefs):
        with perturbed_in_place(model, zm, seed, coef, table.eps, table.kind):
            outs.append(model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **kwargs))
    return outs


def assert_same_tokens(ours: torch.Tensor, references: list[torch.Tensor]) -> None:
    assert ours.shape[0] == len(references)
    for g, ref in enumerate(references):
        width = ref.shape[1]
        assert torch.equal(ours[g, :, :width], ref), f"group {g}: {ours[g].tolist()} vs {ref.tolist()}"
        assert bool((ours[g, :, width:] == PAD).all()), "a group that finished early is padded"


FAMILIES = {
    "llama": tiny_llama,
    "gpt2-learned-positions": tiny_gpt2,
    "mixtral-moe": functools.partial(tiny_mixtral, experts="batched_mm"),
    "t5-encoder-decoder": tiny_t5,
    "llama-lora": tiny_lora_llama,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_groups_greedy_tokens_equal_explicitly_perturbed_generate(family):
    batch = left_padded()
    model, zm = compiled_family(family)
    ours = zm.generate(batch, TABLE, 8)
    assert_same_tokens(ours, explicit_generate(model, zm, batch, TABLE, 8))
    assert not torch.equal(ours[1], ours[2]), "the perturbation reaches the tokens"


@pytest.mark.parametrize("family", ["llama", pytest.param("mixtral-moe", marks=pytest.mark.slow),
                                    pytest.param("gpt2-learned-positions", marks=pytest.mark.slow)])
def test_low_rank_groups_decode_as_explicitly_perturbed_generate(family):
    batch = left_padded(seed=3)
    model, zm = compiled_family(family)
    table = GroupTable([0, 11, 12], [0.0, 1.0, 1.0], 0.5, "lowrank", rank=2)
    ours = zm.generate(batch, table, 8)
    assert_same_tokens(ours, explicit_generate(model, zm, batch, table, 8))
    assert not torch.equal(ours[1], ours[2]), "the perturbation reaches the tokens"


@pytest.mark.parametrize("family", ["llama", "llama-lora"])
def test_cached_decoding_equals_uncached(family):
    batch = left_padded(seed=5)
    _, zm = compiled_family(family)
    assert zm.decoder().cached, zm.decoder().reason
    cached = zm.generate(batch, TABLE, 12)
    assert torch.equal(cached, zm.generate(batch, TABLE, 12, use_cache=False))
    assert "KV cache (a prefill graph" in str(zm.report())


def test_min_new_tokens_and_eos_per_sequence_as_generate():
    batch = left_padded(seed=3)
    model, zm = compiled_family("llama")
    unconstrained = zm.generate(batch, TABLE, 10)
    eos = int(unconstrained[0, 0, 7])  # a token group 0 emits early on: make it the EOS
    outputs = {}
    for min_new in (0, 4):
        model.generation_config.eos_token_id = eos
        try:
            ours = outputs[min_new] = zm.generate(batch, TABLE, 10, min_new_tokens=min_new)
            assert_same_tokens(ours, explicit_generate(model, zm, batch, TABLE, 10, min_new_tokens=min_new))
        finally:
            model.generation_config.eos_token_id = EOS
        stops = ours[:, :, 6:] == eos
        first = stops.float().argmax(-1)
        assert bool((first[stops.any(-1)] >= min_new).all()), "no EOS before min_new_tokens"
    stopped = (outputs[0][:, :, 6:] == eos).any(-1)
    assert stopped.any() and not stopped.all(), "some sequences stop at EOS, others run on"
    assert not torch.equal(outputs[0], outputs[4]), "min_new_tokens changed what was decoded"


def test_sampling_with_a_seed_is_reproducible_and_differs_between_groups():
    batch = left_padded()
    _, zm = compiled_family("llama")
    table = GroupTable([0, 0, 0], [0.0, 0.0, 0.0], 1e-3)  # the same model three times: only sampling differs
    kwargs = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    a = zm.generate(batch, table, 8, seed=7, **kwargs)
    b = zm.generate(batch, table, 8, seed=7, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1]), "each group draws its own samples"
    assert not torch.equal(a, zm.generate(batch, table, 8, seed=8, **kwargs))


def test_what_cannot_be_decoded_exactly_is_refused():
    batch = left_padded()
    model, zm = compiled_family("llama")
    with pytest.raises(GenerationSettingError, match="repetition_penalty"):
        zm.generate(batch, TABLE, 4, repetition_penalty=1.2)
    with pytest.raises(GenerationSettingError, match="unknown generation argument"):
        zm.generate(batch, TABLE, 4, beams=2)
    model.generation_config.num_beams = 4
    try:
        with pytest.raises(GenerationSettingError, match="num_beams"):
            zm.generate(batch, TABLE, 4)
    finally:
        model.generation_config.num_beams = 1
    right = {"input_ids": batch["input_ids"].flip(1), "attention_mask": batch["attention_mask"].flip(1)}
    with pytest.raises(ValueError, match="left"):
        zm.generate(right, TABLE, 4)


def test_a_model_decoded_without_a_cache_says_why():
    _, zm = compiled_family("t5-encoder-decoder")
    zm.generate(left_padded(), TABLE, 2)
    assert not zm.decoder().cached and "no KV cache (encoder-decoder" in str(zm.report())
