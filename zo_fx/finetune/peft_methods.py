"""Which PEFT methods ``--peft`` and ``--peft-config`` build, with what settings, and why some are refused.

PEFT names its methods in ``peft.PeftType``; ``--peft`` takes each one's lower-case name (plus
``dora``, LoRA with a learned magnitude vector, and the historical ``prefix`` and ``prompt``). A
method is listed in :data:`PEFT_METHODS` when a tiny Llama, GPT-2 or BERT wrapped in it compiles
with ``zo_compile``, takes a step, and its saved adapter reloads with
``PeftModel.from_pretrained`` to the run's final score (tests/test_cli_peft.py checks every one
with ``-m slow``). The others are in :data:`REFUSED_PEFT` with the reason, so the CLI can say
why and what to use instead before any model is loaded.

Settings: a method gets PEFT's own defaults, except where they cannot fit the model or a
zeroth-order run. Targets come from PEFT's per-architecture table
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_<METHOD>_TARGET_MODULES_MAPPING``) when it knows
the model type, else the attention projections found by name, else ``"all-linear"``. Sizes that
must divide a layer's width (OFT/BOFT blocks, C3A blocks, RoAd groups, VB-LoRA vectors) or stay
below its size (FourierFT/WaveFT frequencies, SHiRA's sparse budget, ranks) are shrunk to the
targeted layers. ``--peft-config FILE`` starts from the same settings and replaces any of them.

peft is imported lazily: ``zo-fx finetune --help`` and config validation without
``--peft-config`` must not pay for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

#: ``--peft`` values that build an adapter zo_fx trains and saves (``none`` is full fine-tuning)
PEFT_METHODS = (
    "lora", "dora", "adalora", "ia3", "loha", "lokr", "vera", "oft", "boft", "fourierft", "ln_tuning", "miss",
    "randlora", "c3a", "road", "waveft", "vblora", "pvera", "unilora", "tinylora", "gralora", "hira", "delora",
    "deft", "glora", "lily", "peanut", "psoft", "beft", "osf", "supertuning", "prefix", "prompt", "p_tuning",
    "adaption_prompt", "cartridge",
)
#: other spellings accepted for a method (PEFT's own names of the virtual-token methods, MiSS's old name)
PEFT_ALIASES = {"prefix_tuning": "prefix", "prompt_tuning": "prompt", "bone": "miss"}
#: methods that put virtual tokens or adapter prompts in front of a causal LM's input
VIRTUAL_TOKEN_METHODS = ("prefix", "prompt", "p_tuning", "adaption_prompt", "cartridge", "cpt",
                         "multitask_prompt_tuning")
#: methods whose PEFT layers take GPT-2's Conv1D projections (checked on a tiny GPT-2); the others take
#: only nn.Linear, and PEFT refuses them on such a model
CONV1D_METHODS = ("lora", "dora", "adalora", "ia3", "vera", "pvera", "fourierft", "waveft", "vblora", "unilora",
                  "randlora", "hira", "gralora", "tinylora", "deft", "ln_tuning", "prefix", "prompt", "p_tuning",
                  "adaption_prompt")

#: PeftType methods ``--peft`` does not build, and why; each message says what to do instead
REFUSED_PEFT = {
    "trainable_tokens": "it trains the embedding rows of chosen tokens, and which tokens is the user's choice: "
                        "give them in --peft-config ({\"peft_type\": \"TRAINABLE_TOKENS\", \"token_indices\": "
                        "[...], \"target_modules\": [\"embed_tokens\"]})",
    "hra": "PEFT's HRA layers read base_layer.weight.data inside forward, which torch.export (zo_compile's "
           "capture) cannot trace; --peft oft or boft adapt a weight by an orthogonal transform too",
    "shira": "PEFT's SHiRA layers read base_layer.weight.data inside forward, which torch.export (zo_compile's "
             "capture) cannot trace; --peft lora, vblora or fourierft train few parameters too",
    "frod": "its layers branch on tensor values (data-dependent control flow) that torch.export cannot capture; "
            "--peft vera or pvera adapt through shared random projections too",
    "shadow": "its shadow-network carrier objects cannot be captured by torch.export; use --peft lora",
    "adamss": "PEFT's AdaMSS needs scikit-learn, which zo_fx does not depend on, and its subspace re-allocation "
              "is driven by gradients; use --peft lora or adalora",
    "xlora": "X-LoRA mixes LoRA adapters that are already trained; train one with --peft lora first",
    "poly": "Poly routes each example by a task id the classification loss does not pass; use --peft lora",
    "multitask_prompt_tuning": "it needs a task id per example, which the job does not pass; use --peft prompt",
    "cpt": "CPT's loss weighting and token-type masks belong to its own training loop, and its forward branches "
           "on tensor values torch.export cannot capture; use --peft prompt",
}

_PEFT_TYPE = {"dora": "LORA", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}
#: a ``--peft-config`` file's bookkeeping keys that are not settings of the method
_IGNORED_KEYS = ("peft_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                 "auto_mapping")

LORA_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",), ("Wqkv",))
LORA_RANK, LORA_ALPHA = 8, 16  # MeZO's LoRA setting (Malladi et al. 2023, appendix E)
PREFIX_TOKENS = 5  # MeZO's prefix-tuning setting
PROMPT_TOKENS = 10


class PeftSetupError(ValueError):
    """A method or setting that cannot be built for this model; the message says what to do."""


def canonical(name: str) -> str:
    """``name`` as :data:`PEFT_METHODS` spells it (lower case, aliases resolved)."""
    low = name.strip().lower().replace("-", "_")
    return PEFT_ALIASES.get(low, low)


def refusal(name: str) -> str | None:
    """Why ``--peft name`` is refused, or None when it is a method zo_fx builds (or ``none``)."""
    low = canonical(name)
    if low == "none" or low in PEFT_METHODS:
        return None
    if low in REFUSED_PEFT:
        return f"--peft {name} is not supported by zo_fx: {REFUSED_PEFT[low]}"
    return (f"--peft {name!r} is not a PEFT method zo_fx knows; choose one of none, {', '.join(PEFT_METHODS)} "
            "(or describe any method in a JSON file for --peft-config)")


def peft_type_of(method: str) -> str:
    """The ``PeftType`` value (``"LORA"``, ...) of a ``--peft`` name."""
    return _PEFT_TYPE.get(method, method.upper())


def method_of_peft_type(value: str, use_dora: bool = False) -> str:
    """The ``--peft`` name of a ``peft_type`` as written in an adapter_config.json (or a ``--peft`` name)."""
    low = canonical(str(value))
    low = {"prefix_tuning": "prefix", "prompt_tuning": "prompt"}.get(low, low)
    return "dora" if low == "lora" and use_dora else low


def _config_class(method: str):
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type_of(method))]
    except (ValueError, KeyError):
        import peft

        raise PeftSetupError(f"the installed peft {peft.__version__} has no {peft_type_of(method)} method; "
                             "upgrade peft or choose another --peft") from None


# ---- --peft-config ---------------------------------------------------------------------------------------


def read_peft_config_file(path: str) -> tuple[str, dict]:
    """The ``--peft`` name and the settings of a ``--peft-config`` file, checked against PEFT's config class.

    The file is a PEFT ``adapter_config.json`` or any JSON object of a config's fields with a
    ``peft_type`` (``"IA3"`` or a ``--peft`` name such as ``"dora"``). Bookkeeping keys of a saved
    adapter (base model path, peft version, inference mode) are dropped: the run decides those.
    """
    file = Path(path).expanduser()
    where = f"--peft-config {path}"
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise PeftSetupError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PeftSetupError(f"{where}: cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise PeftSetupError(f"{where} is not valid JSON ({err}); give a PEFT adapter_config.json or a JSON "
                             "object of a config's fields with a \"peft_type\"") from None
    if not isinstance(data, dict):
        raise PeftSetupError(f"{where} holds a JSON {type(data).__name__}; it must be an object of a PEFT config's "
                             "fields with a \"peft_type\"")
    if not isinstance(data.get("peft_type"), str):
        raise PeftSetupError(f"{where} has no \"peft_type\" (e.g. \"LORA\", \"IA3\", \"VERA\"): it names the PEFT "
                             "method the fields belong to")
    method = method_of_peft_type(data["peft_type"], bool(data.get("use_dora")))
    reason = refusal(method)
    if reason and method not in REFUSED_PEFT:  # a refused method may still be built from a full config
        raise PeftSetupError(f"{where}: peft_type {data['peft_type']!r} is not a PEFT method zo_fx knows; choose "
                             f"one of {', '.join(peft_type_of(m) for m in PEFT_METHODS if m != 'dora')}")
    if method in REFUSED_PEFT and method != "trainable_tokens":  # a full config does not change why
        raise PeftSetupError(f"{where}: {reason}")
    cls = _config_class(method)
    known = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in data.items() if k not in _IGNORED_KEYS}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PeftSetupError(f"{where}: {cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; its fields "
                             f"are {', '.join(sorted(known - set(_IGNORED_KEYS)))}")
    for f in dataclasses.fields(cls):  # a number or a flag where PEFT's default is one (PEFT checks few types)
        if f.name in fields and isinstance(f.default, (bool, int, float)):
            value, want_bool = fields[f.name], isinstance(f.default, bool)
            if (isinstance(value, bool) if want_bool else isinstance(value, (int, float)) and not isinstance(
                    value, bool)) is False:
                kind = "true or false" if want_bool else "a number"
                raise PeftSetupError(f"{where}: {cls.__name__}.{f.name} must be {kind}; got {value!r}")
    task = fields.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise PeftSetupError(f"{where}: task_type {task!r}: zo-fx finetune trains a language model's head "
                             "(CAUSAL_LM, or no task_type for a masked LM); drop the field or set \"CAUSAL_LM\"")
    try:  # the fields' values, as PEFT itself checks them (the model-dependent checks come at build time)
        cls(**{**fields, **({"total_step": 1} if method == "adalora" and not fields.get("total_step") else {})})
    except (TypeError, ValueError) as err:
        raise PeftSetupError(f"{where}: {cls.__name__} refuses these settings: {err}") from None
    if method == "dora":
        fields["use_dora"] = True
    return method, fields


# ---- default settings per method and model ---------------------------------------------------------------


def _leaf_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())}


def _linear_layers(model, conv1d_only: bool = False) -> dict:
    """Name -> (in_features, out_features) of every linear layer (``nn.Linear``, GPT-2's ``Conv1D``)
    except the output head, as PEFT's ``"all-linear"`` picks them (only the ``Conv1D`` ones if asked)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear) and not conv1d_only:
            found[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            found[name] = tuple(module.weight.shape)  # Conv1D keeps its weight as [in, out]
    return found


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return targets == "all-linear" or name == targets or name.endswith("." + targets)
    return any(name == t or name.endswith("." + t) for t in targets)


def _peft_mapping(method: str, model_type: str, kind: str = "TARGET_MODULES"):
    from peft.utils import constants

    key = {"dora": "LORA", "ln_tuning": "LNTUNING"}.get(method, method.upper())
    table = getattr(constants, f"TRANSFORMERS_MODELS_TO_{key}_{kind}_MAPPING", None) or {}
    found = table.get(model_type)
    return list(found) if found else None


def attention_targets(model) -> list[str] | None:
    """The attention projections MeZO's LoRA adapts (q and v, or a fused qkv), found by their names."""
    leaves = _leaf_names(model)
    return next((list(t) for t in LORA_TARGETS if set(t) <= leaves), None)


def default_targets(method: str, model):
    """PEFT's targets for this architecture, else the attention projections by name, else ``"all-linear"``."""
    if method == "lora":  # unchanged since the first --peft lora runs (their adapters and trajectories)
        return attention_targets(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _peft_mapping(method, model_type) or attention_targets(model) or "all-linear"


def _norm_targets(model) -> list[str]:
    """The last name of every normalisation layer (LayerNorm, RMSNorm, ...), for LN tuning without a table."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if n and "norm" in type(m).__name__.lower() and not list(m.children())})


def _largest_divisor(n: int, at_most: int, even: bool = False) -> int:
    """The largest divisor of ``n`` up to ``at_most`` (an even one if ``even``): a block size that tiles ``n``."""
    options = [d for d in range(1, min(n, at_most) + 1) if n % d == 0 and (d % 2 == 0 or not even)]
    return max(options) if options else (2 if even else 1)


def default_settings(method: str, model, seed: int, steps: int | None = None) -> dict:
    """The fields of ``method``'s PEFT config as ``--peft method`` builds it for ``model``."""
    if method == "lora":
        targets = attention_targets(model)
        if targets is None:
            raise PeftSetupError(f"--peft lora: found no attention projections named like {LORA_TARGETS} in "
                                 f"{type(model).__name__}; name target_modules in --peft-config, or use --peft "
                                 "prompt, or no adapter")
        return {"r": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "target_modules": targets}
    if method in ("prefix", "cartridge"):  # cartridge: a trainable KV prefix, initialised as prefix tuning's
        return {"num_virtual_tokens": PREFIX_TOKENS}
    if method in ("prompt", "p_tuning"):
        return {"num_virtual_tokens": PROMPT_TOKENS}
    if method == "adaption_prompt":  # LLaMA-Adapter: 10 adapter tokens in every layer (the paper's top 30)
        layers = getattr(getattr(model, "config", None), "num_hidden_layers", 1)
        return {"adapter_len": PROMPT_TOKENS, "adapter_layers": min(layers, 30)}
    if method == "ln_tuning":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return {"target_modules": _peft_mapping(method, model_type) or _norm_targets(model)}

    targets = default_targets(method, model)
    out = {"target_modules": targets}
    dims = [d for n, d in _linear_layers(model).items() if _matches(n, targets)] or [(1 << 30, 1 << 30)]
    ins, outs = [i for i, _ in dims], [o for _, o in dims]
    smallest = min(min(i, o) for i, o in dims)
    if method == "dora":
        out.update(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, use_dora=True)
    elif method == "adalora":
        # Its rank re-allocation scores singular values by their gradients, which a zeroth-order run does
        # not have: it trains at a fixed rank (init_r = target_r), LoRA's 8, in AdaLoRA's SVD form.
        out.update(init_r=LORA_RANK, target_r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                   total_step=max(int(steps or 1), 1))
    elif method == "ia3":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table = _peft_mapping(method, model_type)
        if table:  # IA3's own table: key/value and the MLP's output, the latter scaling its input
            out.update(target_modules=table, feedforward_modules=_peft_mapping(method, model_type,
                                                                                 "FEEDFORWARD_MODULES") or [])
        else:
            out.update(feedforward_modules=[])
    elif method in ("loha", "lokr"):
        out.update(r=LORA_RANK, alpha=LORA_ALPHA)
    elif method in ("fourierft", "waveft"):  # no more frequencies than a targeted weight has entries
        default = {"fourierft": 1000, "waveft": 2592}[method]
        out.update(n_frequency=min(default, min(i * o for i, o in dims)), random_loc_seed=seed)
    elif method == "oft":  # blocks tile the input features
        out.update(r=0, oft_block_size=_largest_divisor(math.gcd(*ins), 32))
    elif method == "boft":
        out.update(boft_block_size=_largest_divisor(math.gcd(*ins), 4), boft_n_butterfly_factor=1)
    elif method == "c3a":  # circulant blocks tile both sides
        out.update(block_size=_largest_divisor(math.gcd(*ins, *outs), 256))
    elif method == "road":  # rotations pair features inside groups of the output
        out.update(group_size=_largest_divisor(math.gcd(*outs), 64, even=True))
    elif method == "vblora":  # the vector bank's vectors tile both sides
        out.update(vector_length=_largest_divisor(math.gcd(*ins, *outs), 256))
    elif method == "shira":  # as many trainable entries as a rank-r LoRA, at most all of the weight
        out.update(r=max(1, min(32, min(i * o // (i + o) for i, o in dims))), random_seed=seed)
    elif method == "psoft":  # its rank cannot pass the smaller side of a targeted weight
        out.update(r=min(32, smallest))
    elif method == "miss":
        out.update(r=_largest_divisor(math.gcd(*outs), 64))
    elif method == "randlora":  # several random bases of rank r must fit the smaller side
        out.update(r=max(1, min(32, smallest // 2)), projection_prng_key=seed)
    elif method == "vera":
        out.update(projection_prng_key=seed)
    return out


def build_peft_config(model, method: str, seed: int, fields: dict | None = None, steps: int | None = None):
    """The PEFT config of ``--peft method`` (and ``--peft-config``'s ``fields``, which win) for ``model``."""
    from zo_fx.finetune.model import is_masked_lm

    masked = is_masked_lm(model)
    if masked and method in VIRTUAL_TOKEN_METHODS:
        raise PeftSetupError(f"--peft {method} puts virtual tokens before the prompt of a causal LM; "
                             f"{type(model).__name__} is a masked LM: use --peft lora (or another adapter that "
                             "changes weights, e.g. ia3, loha, vera), or no adapter")
    cls = _config_class(method)
    settings = {} if method == "trainable_tokens" else default_settings(method, model, seed, steps)
    settings.update(fields or {})
    targets = settings.get("target_modules")
    if method not in CONV1D_METHODS and targets and any(_matches(n, targets) for n in _linear_layers(model, True)):
        usable = ", ".join(m for m in CONV1D_METHODS if m not in VIRTUAL_TOKEN_METHODS)
        raise PeftSetupError(
            f"--peft {method}: PEFT's {method} layers take only nn.Linear, and {type(model).__name__} keeps the "
            f"targeted projections in transformers' Conv1D layers; use one of {usable} (or prefix, prompt, "
            "p_tuning), or name nn.Linear target_modules in --peft-config")
    settings["task_type"] = None if masked else "CAUSAL_LM"
    settings.pop("inference_mode", None)
    if method == "adalora" and not settings.get("total_step"):
        settings["total_step"] = max(int(steps or 1), 1)
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in settings.items() if k in known})
    except (TypeError, ValueError) as err:
        raise PeftSetupError(f"--peft {method}: {cls.__name__} refuses the settings {settings}: {err}; give "
                             "others in --peft-config") from None


def prompt_offset(model) -> int:
    """How many virtual tokens a prompt-learning adapter puts before the model's outputs (0 for the others).

    Prompt tuning and P-tuning prepend their tokens to the input embeddings, so the logits start with
    them; prefix tuning, cartridges and LLaMA-Adapter put theirs in the attention's keys and values only.
    """
    configs = getattr(model, "peft_config", None) or {}
    config = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()), None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    if str(getattr(config.peft_type, "value", config.peft_type)) in ("PREFIX_TUNING", "CARTRIDGE"):
        return 0
    return int(config.num_virtual_tokens) * int(getattr(config, "num_transformer_submodules", None) or 1)
