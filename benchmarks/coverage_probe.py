"""Which tiny models zo_fx compiles, and whether what it computes is right.

For every entry of ``tests/zoo_more.py``'s ``ZOO`` (or ``--only NAME``, repeatable)
this builds the tiny model and its batch, calls ``zo_fx.zo_compile(model, batch)``,
evaluates ``zm.group_losses`` on the table ``GroupTable([5, 5, 0], [1.0, -1.0, 0.0],
1e-3, "rademacher")`` and compares it with ``tests/explicit.py``'s reference (the eager
model with its weights explicitly perturbed). Every exception is caught per model.

One line per model: name, status, seconds (build / compile / groups / reference). Status:

* ``ok``: max relative error of the G x B losses within ``--tol`` (1e-9 for float64
  outputs, 1e-5 for float32 ones, e.g. Mamba casts its logits to float32), and the
  difference l_0 - l_1 (what a ZO step uses) within ``--diff-tol`` of the reference's;
* ``MISMATCH rel_err=..``: it ran without error and computed something else (the
  important finding: a silent wrong answer);
* ``NO-EFFECT``: it matches, but the perturbation changes no loss (l_0 == l_1 in
  the reference): the zoo entry does not exercise the perturbation;
* ``PARTIAL``: it matches, but some trainable tensors are not among the compiled
  module's parameters (or their direction is all zero). The reference perturbs what
  ``zm.direction`` returns, so it cannot see a tensor the compiler silently froze;
* ``<phase> <ErrorType>: <message[:200]>``: phase is build, compile (zo_compile),
  groups (zm.group_losses, where the rewrite runs) or reference.

With ``--reach`` it also checks, in eager mode only, that perturbing each trainable
tensor on its own changes the loss (a property of the zoo, not of zo_fx). With
``--control`` the reference uses other seeds ([6, 6, 0]) than the compiled table: a
negative control, every entry whose perturbation reaches the loss must then MISMATCH.

Every model is also checked to come out of ``zo_compile`` (and ``group_losses``) as it went
in: its parameters and buffers bitwise, its training flags and hooks, ``copy.deepcopy`` of it,
and its eager output, bitwise equal to the eager output taken before compiling (the model's
own forward run twice first, to know it is reproducible). A difference is status
``CHANGED: <what>`` (ranked after MISMATCH, before NO-EFFECT).

``--auto TASKS`` (comma list of causal-lm, masked-lm, seq-cls, token-cls, qa,
multiple-choice, seq2seq-lm; bare ``--auto``: all) probes families no list names: every class
of transformers' auto mapping for each task, built from its config class with the defaults
shrunk (hidden 32, 2 layers, 4 heads, head_dim 8, vocab 96, 64 positions, a few experts, no
dropout, ``experts_implementation="batched_mm"`` since grouped_mm has no float64 CPU kernel),
float64, eval mode, constant-initialised trainable tensors (biases at 0, norms at 1, zero
gates) jittered by ``0.02 * randn``. The batch per task is right-padded (B=3, T=7; multiple
choice [3, 4, 6]) with ids clear of the special tokens. The loss is ``default_loss`` when it
knows the class, the task's own built-in loss otherwise. Status ``skip: <why>`` marks classes
the probe does not try: a non-text main input (pixels, audio), a forward that requires more
than text inputs, a class or config transformers cannot build at that size, a model whose own
eager forward fails on the batch, a class already probed under an earlier task. The per-model
timeout defaults to 60 s there.

The summary at the end sorts every model into: exact, clear refusal (``ExportFailedError``,
``UncoveredParameterUseError``, ``UnsupportedGraphError``, ``ValueError``/``TypeError``),
mismatch, changed, no-effect, partial, raw exception (any other exception from zo_compile or
group_losses: a defect), timeout, other error (the probe's own reference), skip; and lists
the refusals, mismatches and raw exceptions.

Output torch prints while a model fails (export dumps the whole graph to stderr) is kept
out of the table; its tail is in the JSON (``stderr_tail``); ``--verbose`` shows it.

    python benchmarks/coverage_probe.py --json runs/coverage_probe.json
    python benchmarks/coverage_probe.py --auto causal-lm,seq-cls --json runs/coverage_probe_auto.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import io
import json
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from explicit import explicit_group_losses  # noqa: E402
from model_zoo import VOCAB  # noqa: E402
from zoo_more import ZOO  # noqa: E402

import zo_fx  # noqa: E402
from zo_fx import losses as zl  # noqa: E402
from zo_fx.losses import default_loss  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
DIFF_TOL = {torch.float64: 1e-6, torch.float32: 5e-2}
LOSS_ONLY = ("labels", "start_positions", "end_positions")  # batch keys no forward gets here
REFUSALS = ("ExportFailedError", "UncoveredParameterUseError", "UnsupportedGraphError", "ValueError", "TypeError")


class ProbeTimeout(Exception):
    pass


class Skip(Exception):
    """The probe does not try this model (not a finding about zo_fx)."""


def _alarm(signum, frame):
    raise ProbeTimeout("probe timed out")


def _table() -> zo_fx.GroupTable:
    return zo_fx.GroupTable([5, 5, 0], [1.0, -1.0, 0.0], 1e-3, "rademacher")


def _error(phase: str, err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return f"{phase} {type(err).__name__}: {msg[:200]}"


def reach(model, batch, loss_fn, eps: float = 1e-3, seed: int = 0) -> list[str]:
    """Trainable tensors whose perturbation alone leaves every loss unchanged (eager, in place, restored)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    g = torch.Generator().manual_seed(seed)
    dead = []
    with torch.no_grad():
        base = loss_fn(model(**inputs).logits, batch)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            saved = p.detach().clone()
            p.add_(eps * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            moved = loss_fn(model(**inputs).logits, batch)
            p.copy_(saved)
            if torch.equal(moved, base):
                dead.append(name)
    return dead


# ---- is the model left as it was? -------------------------------------------------------------------------


def _output_tensors(out, prefix: str = "out") -> dict:
    """Every tensor in a model output (ModelOutput / dict / tuple / tensor), by path; caches and other objects
    are left out."""
    found: dict = {}
    if isinstance(out, torch.Tensor):
        found[prefix] = out.detach().clone()
    elif isinstance(out, dict):
        for k, v in out.items():
            found.update(_output_tensors(v, f"{prefix}.{k}"))
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            found.update(_output_tensors(v, f"{prefix}[{i}]"))
    return found


def _eager(model, batch) -> dict:
    with torch.no_grad():
        return _output_tensors(model(**{k: v for k, v in batch.items() if k not in LOSS_ONLY}))


def _same_tensors(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (bitwise; NaN equals NaN) or exist on one side only."""
    diff = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)):
            diff.append(k)
    return diff


def _hooks(model) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")
    return sum(len(getattr(m, n, {})) for m in model.modules() for n in names)


def _snapshot(model) -> dict:
    tensors = {f"param {n}": p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    tensors.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)
                    if isinstance(b, torch.Tensor)})
    return {"tensors": tensors, "training": [m.training for m in model.modules()], "hooks": _hooks(model),
            "requires_grad": [p.requires_grad for p in model.parameters()]}


def unchanged(model, batch, before: dict, eager_before: dict | None) -> list[str]:
    """What zo_compile (and group_losses) changed on the user's model; [] when nothing."""
    changed = []
    after = _snapshot(model)
    diff = _same_tensors(before["tensors"], after["tensors"])
    if diff:
        changed.append(f"tensors {diff[:4]}" + (f" (+{len(diff) - 4})" if len(diff) > 4 else ""))
    for key in ("training", "hooks", "requires_grad"):
        if before[key] != after[key]:
            changed.append(key)
    try:
        twin = copy.deepcopy(model)
    except ProbeTimeout:
        raise
    except Exception as err:
        changed.append(_error("deepcopy", err))
        twin = None
    if eager_before is not None:
        try:
            diff = _same_tensors(eager_before, _eager(model, batch))
            if diff:
                changed.append(f"eager output {diff[:4]}")
            if twin is not None:
                diff = _same_tensors(eager_before, _eager(twin, batch))
                if diff:
                    changed.append(f"deepcopy's eager output {diff[:4]}")
        except ProbeTimeout:
            raise
        except Exception as err:
            changed.append(_error("eager forward after zo_compile", err))
    return changed


# ---- one model ------------------------------------------------------------------------------------------


def probe(name: str, make_model, make_batch, loss, args, fallback_loss=None) -> dict:
    """Build, compile, evaluate and compare one model. ``fallback_loss``: the loss used when
    ``default_loss`` does not know the class (the --auto run); build and eager failures then are skips."""
    rec: dict = {"name": name, "status": None, "phase": None}
    phase = "build"
    try:
        t = time.perf_counter()
        model = make_model()
        batch = make_batch(model) if fallback_loss is not None else make_batch()
        rec["build_s"] = time.perf_counter() - t
        if loss is None and fallback_loss is not None:
            try:
                default_loss(model)
            except ValueError:
                loss = fallback_loss
                rec["loss"] = getattr(loss, "__name__", type(loss).__name__) + " (default_loss does not know the class)"
        loss_fn = loss or default_loss(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        rec["trainable_tensors"] = len(trainable)
        rec["trainable_numel"] = sum(p.numel() for p in trainable)
        if args.reach:
            phase = "reach"
            rec["dead_tensors"] = reach(model, batch, loss_fn)

        phase = "eager"  # the model's own forward, twice: is its output reproducible bit for bit?
        eager_before = _eager(model, batch)
        again = _eager(model, batch)
        if _same_tensors(eager_before, again):
            rec["eager_reproducible"] = False
            eager_before = None
        before = _snapshot(model)

        phase = "compile"
        t = time.perf_counter()
        zm = zo_fx.zo_compile(model, batch, loss=loss)
        rec["compile_s"] = time.perf_counter() - t
        rec["compiled_tensors"] = len(zm.pids)

        phase = "groups"
        table = _table()
        t = time.perf_counter()
        compiled = zm.group_losses(batch, table)
        rec["groups_s"] = time.perf_counter() - t
        try:
            rec["report"] = zm.report(groups=table.groups).summary()
        except Exception as err:  # the report is extra information; never fail the probe on it
            rec["report"] = _error("report", err)

        trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        rec["not_compiled"] = [n for n in trainable_names if n not in zm.pids]
        directions = zm.direction(table.seeds[0], table.kind).items()
        rec["zero_direction"] = [n for n, u in directions if u.numel() and not u.any()]  # empty tensors aside

        phase = "unchanged"
        rec["changed"] = unchanged(model, batch, before, eager_before)

        phase = "reference"
        ref_table = zo_fx.GroupTable([6, 6, 0], list(table.coefs), table.eps, table.kind) if args.control else table
        t = time.perf_counter()
        ref = explicit_group_losses(model, zm, batch, ref_table, loss_fn=loss_fn)
        rec["reference_s"] = time.perf_counter() - t
    except Skip as err:
        rec["phase"], rec["status"] = "skip", f"skip: {' '.join(str(err).split())[:200]}"
        return rec
    except Exception as err:
        if fallback_loss is not None and phase == "build" and isinstance(err, ProbeTimeout):
            rec["phase"], rec["status"] = "skip", f"skip: build (with its eager check) over {args.timeout} s"
            return rec
        if fallback_loss is not None and phase in ("build", "eager") and not isinstance(err, ProbeTimeout):
            rec["phase"], rec["status"] = "skip", "skip: " + _error(phase, err)
            return rec
        rec["phase"] = phase
        rec["status"] = _error(phase, err)
        rec["traceback"] = traceback.format_exc(limit=-8)
        return rec

    out_dtype = ref.dtype
    tol = args.tol if args.tol is not None else TOL.get(out_dtype, 1e-5)
    diff_tol = args.diff_tol if args.diff_tol is not None else DIFF_TOL.get(out_dtype, 5e-2)
    compiled = compiled.to(ref.dtype)
    rel = ((compiled - ref).abs() / ref.abs().clamp_min(torch.finfo(ref.dtype).tiny)).max().item()
    ref_diff, cmp_diff = ref[0] - ref[1], compiled[0] - compiled[1]
    scale = ref_diff.abs().max().item()
    diff_rel = (cmp_diff - ref_diff).abs().max().item() / scale if scale > 0 else float("inf")
    rec.update(
        output_dtype=str(out_dtype).replace("torch.", ""), rel_err=rel, diff_rel_err=diff_rel, tol=tol,
        diff_tol=diff_tol, ref_g0_g1_max_abs_diff=scale, compiled_g0_g1_max_abs_diff=cmp_diff.abs().max().item(),
        ref_groups_differ=bool(scale > 0), compiled_groups_differ=bool(cmp_diff.abs().max().item() > 0),
        losses_compiled=compiled.tolist(), losses_reference=ref.tolist(),
    )
    rec["phase"] = "done"
    if not bool(torch.isfinite(ref).all()):  # the eager model itself gives NaN/inf: nothing to compare
        rec["phase"] = "reference"
        same = bool(torch.isfinite(compiled).eq(torch.isfinite(ref)).all())
        rec["status"] = (f"reference NonFinite: the eager reference losses are not all finite (compiled: "
                         f"{'the same positions' if same else 'other positions'})")
    elif rel != rel or rel > tol or (scale > 0 and diff_rel > diff_tol):
        rec["status"] = f"MISMATCH rel_err={rel:.2e} diff_rel_err={diff_rel:.2e}"
    elif rec["changed"]:
        rec["status"] = f"CHANGED: {'; '.join(rec['changed'])[:300]}"
    elif scale == 0:
        rec["status"] = f"NO-EFFECT rel_err={rel:.2e} (l_0 == l_1 in the reference)"
    elif rec["not_compiled"] or rec["zero_direction"]:
        rec["status"] = (f"PARTIAL not compiled: {rec['not_compiled']}; zero direction: {rec['zero_direction']}")
    else:
        rec["status"] = "ok"
    return rec


# ---- --auto: every class of transformers' auto mappings, shrunk ------------------------------------------

AUTO_TASKS = {  # task -> (auto mapping, built-in loss used when default_loss does not know the class)
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", zl.causal_lm_loss),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", zl.masked_lm_loss),
    "seq-cls": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", zl.sequence_classification_loss),
    "token-cls": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", zl.token_classification_loss),
    "qa": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", zl.span_qa_loss),
    "multiple-choice": ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", zl.multiple_choice_loss),
    "seq2seq-lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", zl.seq2seq_lm_loss),
}

# Config attributes shrunk when the config has them (aliases through attribute_map included).
TINY = dict(
    hidden_size=32, d_model=32, n_embd=32, embedding_size=32, num_hidden_layers=2, n_layer=2, num_layers=2,
    n_layers=2, encoder_layers=2, decoder_layers=2, num_decoder_layers=2, num_encoder_layers=2,
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, encoder_attention_heads=4, decoder_attention_heads=4,
    num_key_value_heads=2, intermediate_size=48, ffn_dim=48, encoder_ffn_dim=48, decoder_ffn_dim=48, d_ff=48,
    n_inner=48, d_inner=48, ffn_hidden_size=48, head_dim=8, d_kv=8, d_head=8, vocab_size=VOCAB,
    max_position_embeddings=64, n_positions=64,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, n_group=1, topk_group=1, first_k_dense_replace=1,
    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    state_size=8, mamba_d_state=8, router_jitter_noise=0.0, rotary_dim=4,
)
# A second try when the first tiny config does not build or its eager forward fails: keep the config's own
# per-head sizes (derived from hidden/heads, or tied to other fields) and as many kv heads as heads.
RELAXED_DROP = ("head_dim", "d_kv", "d_head", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank",
                "rotary_dim", "linear_key_head_dim", "linear_value_head_dim")
N_SPECIAL = 16  # ids VOCAB-16 .. VOCAB-1 are left to special tokens the config names (image, mask, sep, ...)
FIRST_ID, LAST_ID = 4, VOCAB - N_SPECIAL  # ordinary tokens; 0 pad, 1 bos, 2 eos, 3 spare
CHOICES = 4


def _is_dropout(name: str, value) -> bool:
    return isinstance(value, float) and not isinstance(value, bool) and (
        "dropout" in name or "pdrop" in name or "layerdrop" in name or name == "drop_path_rate")


def _tiny_kwargs(config_cls, relaxed: bool = False) -> dict:
    from transformers import PretrainedConfig

    default = config_cls()
    sizes = {k: v for k, v in TINY.items() if not (relaxed and k in RELAXED_DROP)}
    if relaxed:
        sizes["num_key_value_heads"] = TINY["num_attention_heads"]
    kw = {k: v for k, v in sizes.items() if hasattr(default, k)}
    fields = default.to_dict()
    kw.update({k: 0.0 for k, v in fields.items() if _is_dropout(k, v)})
    if getattr(default, "q_lora_rank", None):
        kw["q_lora_rank"] = 16
    expand = getattr(default, "expand", None)
    if isinstance(expand, int) and "num_heads" in kw and "head_dim" in kw:  # Mamba2: heads * head_dim = expand * hidden
        kw["num_heads"] = expand * TINY["hidden_size"] // TINY["head_dim"]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(default, key):
            kw[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
    start = getattr(default, "decoder_start_token_id", None)
    if isinstance(start, int) and not 0 <= start < VOCAB:
        kw["decoder_start_token_id"] = 2
    elif start is None and getattr(default, "is_encoder_decoder", False):
        kw["decoder_start_token_id"] = 0  # T5 starts its decoder with pad and leaves the attribute unset
    special = sorted(k for k, v in fields.items() if (k.endswith("_token_id") or k.endswith("_token_index"))
                     and k not in kw and k != "decoder_start_token_id" and isinstance(v, int) and v >= FIRST_ID)
    for i, k in enumerate(special):
        kw[k] = VOCAB - 1 - i % N_SPECIAL
    for name in getattr(config_cls, "sub_configs", None) or {}:
        sub = getattr(default, name, None)
        if isinstance(sub, PretrainedConfig):
            with contextlib.suppress(Exception):
                kw[name] = type(sub)(**_tiny_kwargs(type(sub), relaxed)).to_dict()
    kw["experts_implementation"] = "batched_mm"  # "grouped_mm" (the default) has no float64 CPU kernel
    return kw


def _fit_layer_lists(cfg, default_layers):
    """Per-layer lists a config keeps at its default depth: cut to the first 2 layers."""
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(default_layers, int) or not isinstance(n, int) or default_layers <= n:
        return
    for k, v in list(vars(cfg).items()):
        if isinstance(v, list) and len(v) == default_layers and "layer" in k:
            setattr(cfg, k, v[:n])


def _jitter_constants(model, seed: int = 0, scale: float = 0.02):
    """Move trainable tensors that start constant (biases 0, norms 1, zero gates) off that value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad and p.is_floating_point() and p.numel() and bool((p == p.reshape(-1)[0]).all()):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def auto_model(task: str, model_type: str, class_name: str, max_numel: int = 5_000_000):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        cls = getattr(transformers, class_name)
        config_cls = CONFIG_MAPPING[model_type]
    except Exception as err:
        raise Skip(f"not importable: {_error('import', err)}") from None
    main = getattr(cls, "main_input_name", "input_ids")
    if main != "input_ids":
        raise Skip(f"main input is {main} (vision/audio)")
    params = inspect.signature(cls.forward).parameters
    required = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in ("input_ids", "attention_mask")]
    if required:
        raise Skip(f"forward requires {required}")
    failure = None
    for relaxed in (False, True):
        phase = "build"
        try:
            kw = _tiny_kwargs(config_cls, relaxed)
            kw["num_labels"] = 2 if task == "qa" else 3
            cfg = config_cls(**kw)
            _fit_layer_lists(cfg, getattr(config_cls(), "num_hidden_layers", None))
            torch.manual_seed(0)
            model = cls(cfg)
            numel = sum(p.numel() for p in model.parameters())
            if numel > max_numel:
                raise Skip(f"{numel / 1e6:.1f}M parameters at the tiny settings (a size the overrides do not reach)")
            model = model.to(torch.float64).eval()
            _jitter_constants(model)
            phase = "eager"
            _eager(model, auto_batch(task, model))
            return model
        except (Skip, ProbeTimeout):
            raise
        except Exception as err:
            failure = _error(phase, err)
    raise Skip(failure)


def _ids(shape, seed: int) -> torch.Tensor:
    return torch.randint(FIRST_ID, LAST_ID, shape, generator=torch.Generator().manual_seed(seed))


def _cfg_id(cfg, key: str, fallback: int) -> int:
    value = getattr(cfg, key, None) if cfg is not None else None
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and 0 <= value < VOCAB else fallback


def auto_batch(task: str, model, batch_size: int = 3, seq_len: int = 7, seed: int = 0) -> dict:
    """A right-padded batch for ``task`` (example 0 has 2 padding positions) fitting ``model``'s config."""
    cfg = getattr(model, "config", None)
    pad, eos = _cfg_id(cfg, "pad_token_id", 0), _cfg_id(cfg, "eos_token_id", 2)
    if getattr(cfg, "is_encoder_decoder", False) and task in ("causal-lm", "masked-lm", "seq2seq-lm"):
        task = "seq2seq-lm"
    if task == "multiple-choice":
        ids = _ids((batch_size, CHOICES, seq_len - 1), seed)
        mask = torch.ones_like(ids)
        mask[:, :, -1] = 0
        ids[mask == 0] = pad
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch_size) % CHOICES}
    ids = _ids((batch_size, seq_len), seed)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    mask[0, seq_len - 2:] = 0
    if task == "seq2seq-lm":
        tgt_len = 5
        target = _ids((batch_size, tgt_len), seed + 1)
        start = _cfg_id(cfg, "decoder_start_token_id", pad)
        dec = torch.cat([torch.full((batch_size, 1), start, dtype=torch.long), target[:, :-1]], dim=1)
        dec_mask = torch.ones(batch_size, tgt_len, dtype=torch.long)
        dec_mask[0, tgt_len - 2:] = 0
        labels = target.masked_fill(dec_mask == 0, -100)
        ids[mask == 0] = pad
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
                "decoder_attention_mask": dec_mask, "labels": labels}
    lengths = mask.sum(1)
    ids[torch.arange(batch_size), lengths - 1] = eos  # every example ends with eos (BART-style classifiers count them)
    ids[mask == 0] = pad
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "causal-lm":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    elif task == "masked-lm":
        labels = torch.full_like(ids, -100)
        labels[:, [1, 3]] = ids[:, [1, 3]]
        ids[:, 1] = _cfg_id(cfg, "mask_token_id", 3)
        batch["labels"] = labels
    elif task == "seq-cls":
        batch["labels"] = torch.arange(batch_size) % 3
    elif task == "token-cls":
        labels = torch.randint(0, 3, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed + 1))
        batch["labels"] = labels.masked_fill(mask == 0, -100)
    elif task == "qa":
        g = torch.Generator().manual_seed(seed + 1)
        start = torch.randint(0, seq_len - 2, (batch_size,), generator=g)
        end = start + torch.randint(0, 2, (batch_size,), generator=g)
        start[-1], end[-1] = seq_len + 3, seq_len + 4  # an answer truncated away: ignored
        batch.update(start_positions=start, end_positions=end)
    return batch


def auto_entries(tasks: list[str]) -> list[tuple]:
    """(name, make_model, make_batch, fallback_loss, duplicate_of) for every class of the tasks' auto mappings."""
    from transformers.models.auto import modeling_auto

    entries = []
    for task in tasks:
        mapping_name, task_loss = AUTO_TASKS[task]
        for model_type, class_name in getattr(modeling_auto, mapping_name).items():
            if isinstance(class_name, (list, tuple)):
                class_name = class_name[0]
            name = f"{task}:{model_type}:{class_name}"
            entries.append((name, (lambda t=task, m=model_type, c=class_name: auto_model(t, m, c)),
                            (lambda model, t=task: auto_batch(t, model)), task_loss, None))
    return entries


def mark_duplicates(entries: list[tuple]) -> list[tuple]:
    """A class several model types (or tasks) map to is probed once: the entry whose model type names the
    class (llama for LlamaForCausalLM), else the first."""
    def key(entry):
        task, model_type, class_name = entry[0].split(":")
        own = model_type.replace("-", "").replace("_", "").lower() in class_name.lower()
        return (class_name, not own)

    first = {}
    for e in sorted(entries, key=key):
        first.setdefault(e[0].split(":")[2], e[0])
    return [(*e[:4], None if first[e[0].split(":")[2]] == e[0] else first[e[0].split(":")[2]]) for e in entries]


# ---- summary --------------------------------------------------------------------------------------------


def category(rec: dict) -> str:
    status, phase = rec["status"], rec["phase"]
    if phase == "skip":
        return "skip"
    if "ProbeTimeout" in status or phase == "timeout":
        return "timeout"
    if phase == "done":
        return {"ok": "exact", "MISMATCH": "mismatch", "CHANGED:": "changed", "NO-EFFECT": "no-effect",
                "PARTIAL": "partial"}[status.split()[0]]
    error = status.split()[1].rstrip(":") if len(status.split()) > 1 else ""
    if phase in ("compile", "groups", "unchanged"):
        return "clear refusal" if error in REFUSALS else "raw exception"
    return "other error"


ORDER = ("exact", "clear refusal", "mismatch", "changed", "no-effect", "partial", "raw exception", "timeout",
         "other error", "skip")


def summarize(records: list[dict]) -> tuple[dict, list[str]]:
    counts = {c: 0 for c in ORDER}
    for rec in records:
        rec["category"] = category(rec)
        counts[rec["category"]] += 1
    lines = ["", "summary by category:"]
    lines += [f"  {c:<14} {n:>4}" for c, n in counts.items() if n]
    lines.append(f"  {'total':<14} {len(records):>4}")
    for cat in ("mismatch", "changed", "raw exception", "clear refusal", "timeout", "other error", "no-effect",
                "partial"):
        hits = [r for r in records if r["category"] == cat]
        if not hits:
            continue
        lines.append(f"{cat} ({len(hits)}):")
        for r in hits:
            where = ""
            if cat == "raw exception" and r.get("traceback"):
                frames = [ln.strip() for ln in r["traceback"].splitlines() if ln.strip().startswith("File ")]
                where = f"  [at {frames[-1][5:160]}]" if frames else ""
            lines.append(f"  {r['name']}: {r['status'][:240]}{where}")
    skips: dict = {}
    for r in records:
        if r["category"] == "skip":
            why = r["status"][6:]
            key = why.split(":")[0] if why.startswith(("build", "eager", "not importable")) else why[:40]
            skips[key] = skips.get(key, 0) + 1
    if skips:
        ranked = sorted(skips.items(), key=lambda kv: -kv[1])
        lines.append("skips by reason: " + ", ".join(f"{k}: {v}" for k, v in ranked))
    return counts, lines


def _code_version() -> dict:
    """The commit the probe ran on and the zo_fx files changed on top of it (the compiler moves fast)."""
    root = TESTS.parent

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "zo_fx_changes": git("status", "--porcelain", "--", "zo_fx")}
    except (OSError, subprocess.SubprocessError):
        return {}


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _fmt_s(rec: dict, key: str) -> str:
    return f"{rec[key]:.2f}" if key in rec else "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help=f"one of {', '.join(ZOO)} (with --auto: a substring of task:model_type:Class)")
    ap.add_argument("--auto", nargs="?", const=",".join(AUTO_TASKS), default=None, metavar="TASKS",
                    help=f"probe transformers' auto mappings instead of the zoo: comma list of {', '.join(AUTO_TASKS)}"
                         " (bare --auto: all)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    ap.add_argument("--reach", action="store_true", help="also check each trainable tensor reaches the loss (eager)")
    ap.add_argument("--tol", type=float, default=None, help="max relative error of the losses (default by dtype)")
    ap.add_argument("--diff-tol", type=float, default=None, help="max relative error of l_0 - l_1 (default by dtype)")
    ap.add_argument("--control", action="store_true", help="negative control: reference with other seeds")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per model (0: none; default 600, --auto 60)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of every failure")
    args = ap.parse_args(argv)
    if args.timeout is None:
        args.timeout = 60 if args.auto else 600
    torch.set_num_threads(args.threads)

    if args.auto:
        tasks = [t.strip() for t in args.auto.split(",") if t.strip()]
        bad = [t for t in tasks if t not in AUTO_TASKS]
        if bad:
            ap.error(f"unknown task(s) {bad}; known: {', '.join(AUTO_TASKS)}")
        entries = auto_entries(tasks)
        if args.only:
            entries = [e for e in entries if any(o in e[0] for o in args.only)]
        entries = mark_duplicates(entries)
        if args.reach:
            ap.error("--reach reads .logits; use it with the zoo only")
    else:
        names = args.only or list(ZOO)
        unknown = [n for n in names if n not in ZOO]
        if unknown:
            ap.error(f"unknown model(s) {unknown}; known: {', '.join(ZOO)}")
        entries = [(n, ZOO[n][0], ZOO[n][1], None, None) for n in names]

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        transformers = None
    use_alarm = args.timeout > 0 and hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
    width = max(len(e[0]) for e in entries) if entries else 5
    version = _code_version()
    print(f"CPU: {_cpu()}, torch threads {torch.get_num_threads()}; torch {torch.__version__}, transformers "
          f"{getattr(transformers, '__version__', '-')}")
    here = Path(zo_fx.__file__).resolve().parent
    if here.parent == TESTS.parent.resolve():
        print(f"zo_fx at {version.get('commit', '?')[:12]}" + (" + uncommitted zo_fx changes" if version.get(
            "zo_fx_changes") else ""))
    else:  # e.g. PYTHONPATH pointing at a copy of one commit's zo_fx/: the checkout's git state says nothing
        print(f"zo_fx imported from {here} (outside this checkout, whose HEAD is {version.get('commit', '?')[:12]})")
    if args.auto:
        print(f"auto tasks: {args.auto}; per-model timeout {args.timeout} s")
    print(f"{'model':<{width}}  {'build':>6} {'compile':>7} {'groups':>6} {'ref':>6}  status")
    records = []
    for name, make_model, make_batch, fallback, duplicate_of in entries:
        t = time.perf_counter()
        if duplicate_of:
            rec = {"name": name, "status": f"skip: same class as {duplicate_of}", "phase": "skip"}
        else:
            loss = ZOO[name][2] if not args.auto else None
            if use_alarm:
                signal.alarm(args.timeout)
            captured = io.StringIO()
            quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(captured)
            try:
                with quiet, contextlib.redirect_stdout(io.StringIO()) if args.auto else contextlib.nullcontext():
                    rec = probe(name, make_model, make_batch, loss, args, fallback_loss=fallback)
            except ProbeTimeout as err:  # raised outside probe's own handler
                rec = {"name": name, "status": _error("timeout", err), "phase": "timeout"}
            finally:
                if use_alarm:
                    signal.alarm(0)
            if captured.getvalue():
                rec["stderr_tail"] = captured.getvalue()[-2000:]
            if args.auto:  # free what export cached for this model before the next
                with contextlib.suppress(Exception):
                    torch._dynamo.reset()
                gc.collect()
        rec["total_s"] = time.perf_counter() - t
        records.append(rec)
        extra = f" dead={rec['dead_tensors']}" if rec.get("dead_tensors") else ""
        extra += f" [loss: {rec['loss']}]" if rec.get("loss") else ""
        print(f"{name:<{width}}  {_fmt_s(rec, 'build_s'):>6} {_fmt_s(rec, 'compile_s'):>7} "
              f"{_fmt_s(rec, 'groups_s'):>6} {_fmt_s(rec, 'reference_s'):>6}  {rec['status']}{extra}", flush=True)
        if args.verbose and "traceback" in rec:
            print(rec["traceback"])

        if args.json and len(records) % 20 == 0:  # partial results survive an interrupted run
            _write_json(args, version, transformers, records, complete=False)

    counts, lines = summarize(records)
    print("\n".join(lines), flush=True)
    if args.json:
        _write_json(args, version, transformers, records, complete=True)
    return records


def _write_json(args, version, transformers, records, complete: bool):
    counts, _ = summarize(records)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {**vars(args), "json": str(args.json), "torch": torch.__version__, "cpu": _cpu(),
                "transformers": getattr(transformers, "__version__", None),
                "zo_fx_path": str(Path(zo_fx.__file__).parent), **version}
    args.json.write_text(json.dumps({"settings": settings, "complete": complete, "counts": counts,
                                     "results": records}, indent=2, default=str))


if __name__ == "__main__":
    main()
