"""Batched perturbed generation: the G perturbed models of a group table decode their prompts together.

Group g sees ``theta + eps * c_g * u(seed_g)`` at every decoding step, as in
:meth:`ZOModule.group_losses`, but each group now feeds back its own tokens, so the batch
tensors of a step are *grouped* (G slices of G*B rows, group-major): the model is captured
once more for decoding (with ``position_ids`` where the forward takes them, computed from
the attention mask as Hugging Face ``generate`` does for left-padded prompts) and rewritten
with grouped inputs. Each step runs the graph up to the output head on the whole sequence
and the head at the last position only, every group in one call while their logits fit (`ops.head_calls`).

Models that cannot be captured with a KV cache decode **without one**: step t re-runs the prompt and the t-1
tokens before it, so a completion of n tokens costs about ``n * (T + n/2)`` token positions
instead of ``T + n``. ``zm.report()`` and a warning say so. Greedy decoding equals
``model.generate(..., do_sample=False)`` of the explicitly perturbed model token for token;
sampling uses the caller's generator (reproducible, not Hugging Face's random stream).

Settings follow ``GenerationConfig`` with the same meaning and the model's own
generation config as defaults. A setting that would change decoding and is not implemented
here (beams, repetition penalties, ...) is refused, never ignored.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

from .checks import check_int, check_real
from .ops import head_calls
from .passes.capture import capture, live_inputs
from .passes.readout import cut_head
from .passes.rewrite import rewrite
from .streams.table import GroupTable

#: GenerationConfig fields that change what is decoded, with the value that leaves decoding alone
UNSUPPORTED_NEUTRAL = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "force_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0, "max_length": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "diversity_penalty": 0.0,
    "length_penalty": 1.0, "exponential_decay_length_penalty": None, "sequence_bias": None,
    "guidance_scale": None, "renormalize_logits": False, "num_return_sequences": 1, "top_h": None,
    "watermarking_config": None, "dola_layers": None, "prompt_lookup_num_tokens": None,
    "assistant_model": None, "stop_strings": None,
}
SUPPORTED = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
             "pad_token_id", "decoder_start_token_id", "use_cache")


class GenerationSettingError(ValueError):
    """A generation argument that zo_fx cannot honour exactly, or an invalid value."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    decoder_start_token_id: int | None = None
    use_cache: bool = True


def _config_defaults(model) -> dict:
    config = getattr(model, "generation_config", None)
    return config.to_dict() if config is not None and hasattr(config, "to_dict") else {}


def resolve_settings(model, max_new_tokens: int, overrides: dict) -> GenerationSettings:
    """The settings of one ``generate`` call: ``overrides`` over the model's generation config, checked."""
    unknown = sorted(k for k in overrides if k not in SUPPORTED and k not in UNSUPPORTED_NEUTRAL)
    if unknown:
        raise GenerationSettingError(f"unknown generation argument(s) {unknown}; zo_fx takes {list(SUPPORTED)}")
    merged = {**_config_defaults(model), **overrides}
    for key, neutral in UNSUPPORTED_NEUTRAL.items():
        value = merged.get(key, neutral)
        if key in ("max_length", "min_length") and key not in overrides:
            continue  # the config's length defaults are superseded by max_new_tokens / min_new_tokens
        if value not in (neutral, None) and value != neutral:
            raise GenerationSettingError(
                f"generation setting {key}={value!r} (from {'the call' if key in overrides else 'the model'}'s "
                f"generation config) changes decoding and is not implemented by zm.generate; set it to {neutral!r}")
    do_sample = bool(merged.get("do_sample") or False)
    temperature = check_real(merged.get("temperature") or 1.0, "temperature", low=0.0, low_open=True)
    top_k = merged.get("top_k")
    top_k = None if top_k in (None, 0) else check_int(top_k, "top_k", low=1)
    top_p = check_real(merged.get("top_p") if merged.get("top_p") is not None else 1.0, "top_p", low=0.0,
                       high=1.0, low_open=True)
    eos = merged.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    pad = merged.get("pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    start = merged.get("decoder_start_token_id")
    if start is None:
        start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    return GenerationSettings(
        max_new_tokens=check_int(max_new_tokens, "max_new_tokens", low=1),
        min_new_tokens=check_int(merged.get("min_new_tokens") or 0, "min_new_tokens", low=0),
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_ids=eos_ids,
        pad_token_id=int(pad), decoder_start_token_id=None if start is None else int(start),
        use_cache=bool(overrides.get("use_cache", True)),
    )


def process_logits(logits: torch.Tensor, new_tokens: int, s: GenerationSettings) -> torch.Tensor:
    """Hugging Face's logits processors and warpers for the supported settings, in its order (float32)."""
    if new_tokens < s.min_new_tokens and s.eos_token_ids:
        logits = logits.clone()
        logits[:, list(s.eos_token_ids)] = -float("inf")
    if not s.do_sample:
        return logits
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k is not None:
        k = min(s.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - s.top_p)
        remove[..., -1:] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
    return logits


def next_tokens(logits: torch.Tensor, s: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    if not s.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def position_ids_of(mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded sequences, as Hugging Face ``generate`` computes them."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


class Decoder:
    """The decoding graphs of one ZOModule, captured on first use, with grouped inputs.

    Decoder-only models get a KV cache: a prefill graph (prompt -> last-position logits and the
    cache as tensors) and a one-token decode graph (token, cache -> logits, cache), both rewritten
    for G groups, so each group keeps its own cache and a step costs one position per sequence.
    A self-check on a small example compares cached and uncached logits before the cache is
    trusted. Models where that cannot be done (encoder-decoders, prompt-learning adapters, a
    failed capture or check) decode without a cache: the whole sequence every step, head at the
    last position only; ``reason`` says why.
    """

    def __init__(self, zm):
        self.zm = zm
        model = zm.model
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.with_positions = not self.encoder_decoder and forward_takes(model, "position_ids")
        self._uncached = None
        self._graphs: dict = {}
        self.cache: KVCacheGraphs | None = None
        self.reason = self._try_cache()
        #: [G, B] after each generate: which sequences met a non-finite logit (their tokens mean nothing)
        self.last_nonfinite: torch.Tensor | None = None
        #: the "decoding without a cache" warning is given once per compiled module
        self.warned = False

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def describe(self) -> str:
        if self.cached:
            return "generate: KV cache (a prefill graph and a one-token decode graph, one cache per group)"
        return (f"generate: no KV cache ({self.reason}): each new token re-runs the whole sequence, about "
                "(T + n/2) times the positions of a cached step for a prompt of T and n new tokens")

    def _try_cache(self) -> str | None:
        if self.encoder_decoder:
            return "encoder-decoder models decode uncached in this version"
        model = self.zm.model
        config = getattr(model, "peft_config", None)
        if config and any(getattr(c, "is_prompt_learning", False) for c in config.values()):
            return "prompt-learning adapters (prefix/prompt tuning) manage the cache themselves"
        if not self.with_positions or cache_kwarg(model) is None:
            return f"{type(model).__name__}'s forward takes no position_ids and cache"
        try:
            cache = KVCacheGraphs(self.zm)
            problem = cache.self_check(self)
        except Exception as err:  # noqa: BLE001 - any failure means: decode without the cache, and say why
            return f"the cached forward could not be captured ({type(err).__name__}: {str(err)[:200]})"
        if problem:
            return problem
        self.cache = cache
        return None

    def _example(self) -> dict:
        ids = torch.tensor([[3, 4, 5, 6, 7], [0, 0, 4, 5, 6]], dtype=torch.long)
        mask = (torch.arange(5) >= torch.tensor([[0], [2]])).long()
        if self.encoder_decoder:
            return {"input_ids": ids, "attention_mask": mask,
                    "decoder_input_ids": torch.tensor([[0, 3, 4], [0, 5, 6]], dtype=torch.long)}
        example = {"input_ids": ids, "attention_mask": mask}
        if self.with_positions:
            example["position_ids"] = position_ids_of(mask)
        return example

    def uncached(self):
        """(headless capture, head) of the whole-sequence forward, captured when first needed."""
        if self._uncached is None:
            captured = capture(self.zm.model, self._example(), loss_keys=self.zm.loss_keys)
            if captured.pids != self.zm.captured.pids:
                raise AssertionError("the decoding capture names other trainable parameters than the training one")
            cut = cut_head(captured)
            self._uncached = (cut[0], cut[1]) if cut else (captured, None)
        return self._uncached

    def graph(self, table: GroupTable):
        key = (table.groups, table.kind)
        if key not in self._graphs:
            self._graphs[key] = _compiled(self.zm, self.uncached()[0], table)
        return self._graphs[key]

    @torch.no_grad()
    def last_logits(self, inputs: dict, table: GroupTable) -> torch.Tensor:
        """``[G*B, V]`` float32 logits at the last position of every grouped sequence (no cache)."""
        seeds, scales = table.tensors()
        headless, head = self.uncached()
        args = live_inputs(headless, self.zm.model, inputs) + [seeds, scales]
        out = self.graph(table)(*args)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        last = hidden[:, -1]
        if head is None:
            return last.float()
        params = headless.params
        weight, bias = params[head.weight], params[head.bias] if head.bias else None
        pids = self.zm.pids
        rows = []
        b_pid = pids.get(head.bias) if head.bias else None
        for _, _, logits in head_calls(last, weight, bias, pids.get(head.weight), b_pid, table, head.layout):
            if head.out_dtype is not None:
                logits = logits.to(head.out_dtype)
            rows.append(logits.float())
        return torch.cat(rows)


def _compiled(zm, captured, table: GroupTable):
    gm = rewrite(captured, table.groups, table.kind, zm.impl, grouped_inputs=True).graph_module
    return torch.compile(gm, dynamic=True) if zm.backend == "inductor" else gm


def cache_kwarg(model) -> str | None:
    """The name the model's forward takes a cache under (``cache`` in newer transformers)."""
    return next((k for k in ("cache", "past_key_values") if forward_takes(model, k)), None)


def forward_takes(model, name: str) -> bool:
    """Whether the (base) model's forward takes ``name`` by name, as ``generate`` checks before passing it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_tensors(out) -> list[torch.Tensor]:
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        raise TypeError(f"the model returned no layered cache ({type(cache).__name__})")
    tensors = []
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or getattr(layer, "values", None) is None:
            raise TypeError(f"cache layer {type(layer).__name__} holds no key/value tensors")
        tensors += [layer.keys, layer.values]
    return tensors


class KVCacheGraphs:
    """Prefill and one-token decode graphs whose KV cache is graph inputs and outputs (one per group)."""

    def __init__(self, zm):
        from transformers import DynamicCache

        self.zm = zm
        model = zm.model
        kwarg, keep = cache_kwarg(model), forward_takes(model, "logits_to_keep")
        config = getattr(model, "config", None)
        config = model.get_base_model().config if hasattr(model, "get_base_model") else config

        def run(model, tensors, cache=None):
            extra = {kwarg: cache} if cache is not None else {}
            if keep:
                extra["logits_to_keep"] = 1
            out = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                        position_ids=tensors["position_ids"], use_cache=True, **extra)
            return [out.logits[:, -1], *_cache_tensors(out)]

        def decode(model, tensors):
            kv = [tensors[f"kv{i}"] for i in range(self.n_kv)]
            return run(model, tensors, DynamicCache(ddp_cache_data=list(zip(kv[0::2], kv[1::2])), config=config))

        prompt = self._prompt(model, run)
        with torch.no_grad():
            kv = run(model, prompt)[1:]
        self.n_kv = len(kv)
        step = {"input_ids": prompt["input_ids"][:, -1:], "attention_mask": torch.cat(
            [prompt["attention_mask"], torch.ones_like(prompt["attention_mask"][:, :1])], 1),
            "position_ids": prompt["position_ids"][:, -1:] + 1, **{f"kv{i}": t for i, t in enumerate(kv)}}
        dims = {"input_ids": {0}, "position_ids": {0}, "attention_mask": {0, 1},
                **{f"kv{i}": {0, t.dim() - 2} for i, t in enumerate(kv)}}
        self.prefill = capture(model, prompt, call=run)
        self.decode = capture(model, step, call=decode, dynamic_dims=dims)
        for captured in (self.prefill, self.decode):
            if captured.pids != zm.captured.pids:
                raise AssertionError("the cached captures name other trainable parameters than the training one")
        self._graphs: dict = {}

    @staticmethod
    def _prompt(model, run) -> dict:
        """A left-padded example whose length differs from every size of the cache (export merges equal sizes)."""
        def example(length: int) -> dict:
            ids = torch.arange(3, 3 + 2 * length).view(2, length) % 7 + 3
            mask = torch.ones_like(ids)
            mask[1, :2] = 0
            return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
                    "position_ids": position_ids_of(mask)}

        with torch.no_grad():
            sizes = {int(s) for t in run(model, example(5))[1:] for s in t.shape}
        length = next(n for n in range(5, 64) if not ({n, n + 1} & (sizes | {2})))
        return example(length)

    def graphs(self, table: GroupTable):
        key = (table.groups, table.kind)
        if key not in self._graphs:
            self._graphs[key] = (_compiled(self.zm, self.prefill, table), _compiled(self.zm, self.decode, table))
        return self._graphs[key]

    @torch.no_grad()
    def start(self, inputs: dict, table: GroupTable) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seeds, scales = table.tensors()
        out = self.graphs(table)[0](*live_inputs(self.prefill, self.zm.model, inputs), seeds, scales)
        return out[0].float(), list(out[1:])

    @torch.no_grad()
    def step(self, inputs: dict, kv: list[torch.Tensor], table: GroupTable) -> tuple[torch.Tensor, list]:
        seeds, scales = table.tensors()
        batch = {**inputs, **{f"kv{i}": t for i, t in enumerate(kv)}}
        out = self.graphs(table)[1](*live_inputs(self.decode, self.zm.model, batch), seeds, scales)
        return out[0].float(), list(out[1:])

    def self_check(self, decoder: Decoder) -> str | None:
        """Cached graph logits against the eager model's uncached forward on a small left-padded example
        (the unperturbed group; three new tokens): the cache plumbing (positions, masks, the cache rebuilt
        from tensors) is what is checked, the perturbation enters both graphs through the same rewrite."""
        table = GroupTable([0], [0.0], 1e-3)
        prompt = decoder._example()
        logits, kv = self.start(prompt, table)
        seqs, masks = prompt["input_ids"], prompt["attention_mask"]
        dtype = next(iter(self.zm.trainable_parameters().values())).dtype
        tol = 1e-8 if dtype == torch.float64 else 1e-3 if dtype == torch.float32 else 5e-2
        for _ in range(3):
            with torch.no_grad():
                out = self.zm.model(input_ids=seqs, attention_mask=masks, position_ids=position_ids_of(masks),
                                    use_cache=False)
            reference = out.logits[:, -1].float()
            scale = float(reference.abs().max()) or 1.0
            if not torch.allclose(logits, reference, rtol=0, atol=tol * scale):
                worst = float((logits - reference).abs().max()) / scale
                return f"the cached logits differ from the uncached ones by {worst:.2e} of their range"
            token = reference.argmax(-1)[:, None]
            seqs = torch.cat([seqs, token], 1)
            masks = torch.cat([masks, torch.ones_like(token)], 1)
            logits, kv = self.step({"input_ids": token, "attention_mask": masks,
                                    "position_ids": position_ids_of(masks)[:, -1:]}, kv, table)
        return None


def generate(zm, batch: dict, table: GroupTable, max_new_tokens: int, *, generator: torch.Generator | None = None,
             seed: int | None = None, **generation_args) -> torch.Tensor:
    """Decode the G perturbed models of ``table`` on the B prompts of ``batch`` together.

    Returns ``[G, B, T + n]`` token ids (prompt and new tokens) for a decoder-only model and
    ``[G, B, 1 + n]`` decoder tokens for an encoder-decoder; ``n`` is the longest completion
    over all groups, each sequence padded with ``pad_token_id`` after its EOS. A sequence whose
    logits were non-finite at some step is flagged in ``zm.decoder().last_nonfinite``: a reward or
    metric must not be computed from it.
    """
    settings = resolve_settings(zm.model, max_new_tokens, generation_args)
    if generator is None and seed is not None:
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(int(seed))
    decoder = zm.decoder()
    if not decoder.cached and not decoder.warned:
        decoder.warned = True
        warnings.warn(f"zm.{decoder.describe()}", stacklevel=2)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T]; got {tuple(ids.shape)}")
    if not decoder.encoder_decoder and bool((mask[:, -1] == 0).any()):
        raise ValueError("the prompts are right-padded: decoding appends at the end, so pad on the left "
                         "(tokenizer.padding_side = 'left')")
    G, B = table.groups, ids.shape[0]
    grouped = {k: v.repeat(G, *([1] * (v.dim() - 1))) for k, v in (("input_ids", ids), ("attention_mask", mask))}
    if decoder.encoder_decoder:
        if settings.decoder_start_token_id is None:
            raise GenerationSettingError("an encoder-decoder model needs decoder_start_token_id")
        seqs = torch.full((G * B, 1), settings.decoder_start_token_id, dtype=ids.dtype, device=ids.device)
    else:
        seqs = grouped["input_ids"]
    masks = grouped["attention_mask"]
    unfinished = torch.ones(G * B, dtype=torch.bool, device=ids.device)
    eos = torch.tensor(settings.eos_token_ids, dtype=ids.dtype, device=ids.device)
    kv, cached = None, decoder.cached and settings.use_cache
    broken = torch.zeros(G * B, dtype=torch.bool, device=ids.device)  # a non-finite logit at some step
    for step in range(settings.max_new_tokens):
        if cached:
            if kv is None:
                raw, kv = decoder.cache.start({"input_ids": seqs, "attention_mask": masks,
                                               "position_ids": position_ids_of(masks)}, table)
            else:
                raw, kv = decoder.cache.step({"input_ids": seqs[:, -1:], "attention_mask": masks,
                                              "position_ids": position_ids_of(masks)[:, -1:]}, kv, table)
        elif decoder.encoder_decoder:
            raw = decoder.last_logits({**grouped, "decoder_input_ids": seqs}, table)
        else:
            inputs = {"input_ids": seqs, "attention_mask": masks}
            if decoder.with_positions:
                inputs["position_ids"] = position_ids_of(masks)
            raw = decoder.last_logits(inputs, table)
        finite = torch.isfinite(raw).all(-1, keepdim=True)
        broken |= unfinished & ~finite.squeeze(-1)
        raw = torch.where(finite, raw, torch.zeros_like(raw))  # a flagged row decodes on, its tokens unused
        chosen = next_tokens(process_logits(raw, step, settings), settings, generator)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, settings.pad_token_id))
        seqs = torch.cat([seqs, chosen[:, None]], dim=1)
        if not decoder.encoder_decoder:
            masks = torch.cat([masks, torch.ones_like(masks[:, :1])], dim=1)
        if eos.numel():
            unfinished &= ~torch.isin(chosen, eos)
        if not bool(unfinished.any()):
            break
    decoder.last_nonfinite = broken.view(G, B)
    return seqs.view(G, B, -1)
