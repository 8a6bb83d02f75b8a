"""More tiny random-initialised models for coverage probing (no files, no network).

Companion of :mod:`model_zoo`: the same style (float64, eval mode, dropout 0, hidden
size 16-32, 1-2 layers, ``VOCAB`` tokens where the family allows), more families and
more PEFT methods. Every entry of ``ZOO`` is ``name -> (make_model, make_batch, loss)``
where ``loss`` is ``None`` when :func:`zo_fx.losses.default_loss` knows the model class
(all entries: encoder-decoder LMs get ``seq2seq_lm_loss``, image classifiers
``sequence_classification_loss``) and a per-example loss otherwise.

Families: Mixtral (MoE, 4 experts, top-2), T5 and BART (encoder-decoder), Falcon (fused
qkv; old and new decoder architecture), Qwen2, Gemma, Gemma2, Mistral, GPT-NeoX, BLOOM
(ALiBi), Mamba (depthwise conv1d + selective scan), ViT and ResNet (``pixel_values``).

PEFT methods, all on model_zoo's tiny untied Llama, targeting ``q_proj``/``v_proj``
where the method takes target modules: IA3 (plus a feed-forward IA3 on ``down_proj``,
which scales the layer's input instead of its output), DoRA, LoHa, LoKr, AdaLoRA,
FourierFT, OFT, VeRA, BOFT and LN tuning. LoRA, prompt and prefix tuning are in
model_zoo and not repeated here.

Adapter weights are NOT left at their PEFT init. Most adapters start as an exact no-op
(LoRA/DoRA B = 0, IA3 = 1, AdaLoRA E = 0, FourierFT spectrum = 0, OFT/BOFT = identity,
VeRA lambda_b = 0, LN tuning = copies of the norms); at such a point a perturbation of
one factor can have no first-order effect on the loss (e.g. dL/dA = 0 while B = 0), so
a compiler that dropped that factor's perturbation would still match the reference.
Every PEFT constructor therefore adds ``0.1 * randn`` from a seeded generator to every
trainable parameter (:func:`jitter_trainable`), so that a perturbation of every
trainable tensor visibly reaches the loss. Base models are random already (ResNet also
gets non-trivial batch-norm running statistics).

Known exceptions, by the architecture's math, not the init: the key-projection bias of
BART and ViT attention adds a constant to every score of a query's softmax row, so it
never changes the output. ``benchmarks/coverage_probe.py --reach`` lists such tensors.

Not built here: Mixtral's default experts implementation ("grouped_mm") has no float64
CPU kernel, so the zoo uses "eager" (``mixtral``) and "batched_mm" (``mixtral_batched_mm``);
Gemma2 has no sdpa attention, so it uses eager attention. Mamba's logits are float32.
"""

from __future__ import annotations

import torch
from model_zoo import VOCAB, causal_batch, tiny_llama

IMAGE_SIZE = 16
NUM_LABELS = 3


def _finish(model, dtype):
    return model.to(dtype).eval()


def jitter_trainable(model, seed: int, scale: float = 0.1):
    """Add ``scale * randn`` (seeded) to every trainable parameter: moves adapters off their no-op init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


# ---- batches -------------------------------------------------------------------------------------------


def seq2seq_batch(batch_size=3, src_len=7, tgt_len=5, seed=0, decoder_start=0):
    """Encoder input + teacher-forced decoder input; example 0 is right-padded on both sides.

    ``decoder_input_ids`` is the target shifted right behind ``decoder_start``, and
    ``labels`` is the target itself (the next token of every decoder position), -100 on padding.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, src_len), generator=g)
    mask = torch.ones(batch_size, src_len, dtype=torch.long)
    target = torch.randint(3, VOCAB, (batch_size, tgt_len), generator=g)
    dec = torch.cat([torch.full((batch_size, 1), decoder_start, dtype=torch.long), target[:, :-1]], dim=1)
    dec_mask = torch.ones(batch_size, tgt_len, dtype=torch.long)
    labels = target.clone()
    if batch_size > 1:
        mask[0, src_len - 2:] = 0
        dec_mask[0, tgt_len - 2:] = 0
        labels[0, tgt_len - 2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask,
            "labels": labels}


def t5_batch(batch_size=3, seed=0):
    return seq2seq_batch(batch_size, seed=seed, decoder_start=0)  # T5 starts the decoder with pad (0)


def bart_batch(batch_size=3, seed=0):
    return seq2seq_batch(batch_size, seed=seed, decoder_start=2)  # BART starts the decoder with eos (2)


def bart_same_len_batch(batch_size=3, seed=0):
    """Encoder and decoder of the same length: a model run on the wrong decoder input still has the right shape."""
    return seq2seq_batch(batch_size, src_len=7, tgt_len=7, seed=seed, decoder_start=2)


def image_batch(batch_size=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g, dtype=torch.float64).to(dtype)
    return {"pixel_values": pixels, "labels": torch.arange(batch_size) % NUM_LABELS}


# ---- families ------------------------------------------------------------------------------------------

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
                attention_dropout=0.0, tie_word_embeddings=False)


def tiny_mixtral(dtype=torch.float64, seed=0, experts="eager"):
    """4 experts, top-2. ``experts``: transformers' experts implementation. "eager" loops over the experts
    that received tokens (data-dependent); "batched_mm" gathers each token's expert weights. The default,
    "grouped_mm", has no float64 kernel on CPU."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
                        sliding_window=None, experts_implementation=experts)
    return _finish(MixtralForCausalLM(cfg), dtype)


def tiny_qwen2(dtype=torch.float64, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(Qwen2Config(**_DECODER, use_sliding_window=False)), dtype)


def tiny_mistral(dtype=torch.float64, seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return _finish(MistralForCausalLM(MistralConfig(**_DECODER, sliding_window=None)), dtype)


def tiny_gemma(dtype=torch.float64, seed=0):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(**{**_DECODER, "tie_word_embeddings": True}, head_dim=8, hidden_activation="gelu_pytorch_tanh")
    return _finish(GemmaForCausalLM(cfg), dtype)


def tiny_gemma2(dtype=torch.float64, seed=0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(**{**_DECODER, "tie_word_embeddings": True, "attn_implementation": "eager"},  # no sdpa
                       head_dim=8, sliding_window=4,
                       query_pre_attn_scalar=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    return _finish(Gemma2ForCausalLM(cfg), dtype)


def tiny_falcon(dtype=torch.float64, seed=0, new_arch=False):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    if new_arch:  # grouped kv heads in one fused qkv, two layer norms, parallel attention + MLP
        arch = dict(new_decoder_architecture=True, num_kv_heads=2)
    else:  # multi-query attention (one kv head), one layer norm, parallel attention + MLP
        arch = dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True)
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=False,
                       bias=False, hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=64,
                       attn_implementation="sdpa", **arch)
    return _finish(FalconForCausalLM(cfg), dtype)


def tiny_gpt_neox(dtype=torch.float64, seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=True, hidden_dropout=0.0,
                        attention_dropout=0.0, max_position_embeddings=64, tie_word_embeddings=False,
                        attn_implementation="sdpa")
    return _finish(GPTNeoXForCausalLM(cfg), dtype)


def tiny_bloom(dtype=torch.float64, seed=0):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                      attention_dropout=0.0)
    return _finish(BloomForCausalLM(cfg), dtype)


def tiny_mamba(dtype=torch.float64, seed=0):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    # Mamba runs its scan in float32 and returns float32 logits whatever the weights' dtype. With the default
    # time steps (0.001-0.1) a 1e-3 change of A_log or dt_proj alone is below float32 resolution of the loss;
    # time steps of 0.5-2 make every tensor visibly reach the loss.
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2,
                      time_step_rank=4, time_step_min=0.5, time_step_max=2.0, use_cache=False, use_mambapy=False)
    return _finish(MambaForCausalLM(cfg), dtype)


def tiny_t5(dtype=torch.float64, seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   tie_word_embeddings=False, use_cache=False)
    return _finish(T5ForConditionalGeneration(cfg), dtype)


def tiny_bart(dtype=torch.float64, seed=0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                     decoder_layerdrop=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                     forced_eos_token_id=None, attn_implementation="sdpa", use_cache=False)
    return _finish(BartForConditionalGeneration(cfg), dtype)


def tiny_vit(dtype=torch.float64, seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, num_labels=NUM_LABELS, attn_implementation="sdpa")
    return _finish(ViTForImageClassification(cfg), dtype)


def tiny_resnet(dtype=torch.float64, seed=0):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=NUM_LABELS)
    model = ResNetForImageClassification(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial running statistics, so eval-mode batch norm is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1.0 + 0.1 * torch.rand(m.running_var.shape, generator=g))
    return _finish(model, dtype)


# ---- PEFT methods on the tiny Llama ---------------------------------------------------------------------

TARGETS = ["q_proj", "v_proj"]


def _peft_llama(config, dtype=torch.float64, seed=0):
    from peft import get_peft_model

    base = tiny_llama(dtype, tied=False, seed=seed)
    model = get_peft_model(base, config)
    jitter_trainable(model, seed + 1)
    return model.to(dtype).eval()


def tiny_ia3_llama(dtype=torch.float64, seed=0):
    from peft import IA3Config

    return _peft_llama(IA3Config(target_modules=TARGETS, feedforward_modules=[]), dtype, seed)


def tiny_ia3_ff_llama(dtype=torch.float64, seed=0):
    from peft import IA3Config

    cfg = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    return _peft_llama(cfg, dtype, seed)


def tiny_dora_llama(dtype=torch.float64, seed=0):
    from peft import LoraConfig

    return _peft_llama(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_dora=True),
                       dtype, seed)


def tiny_loha_llama(dtype=torch.float64, seed=0):
    from peft import LoHaConfig

    return _peft_llama(LoHaConfig(r=4, alpha=8, target_modules=TARGETS, rank_dropout=0.0, module_dropout=0.0),
                       dtype, seed)


def tiny_lokr_llama(dtype=torch.float64, seed=0):
    from peft import LoKrConfig

    return _peft_llama(LoKrConfig(r=4, alpha=8, target_modules=TARGETS, rank_dropout=0.0, module_dropout=0.0),
                       dtype, seed)


def tiny_adalora_llama(dtype=torch.float64, seed=0):
    from peft import AdaLoraConfig

    cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=10, tinit=2, tfinal=2, target_modules=TARGETS,
                        lora_alpha=8, lora_dropout=0.0)
    return _peft_llama(cfg, dtype, seed)


def tiny_fourierft_llama(dtype=torch.float64, seed=0):
    from peft import FourierFTConfig

    return _peft_llama(FourierFTConfig(n_frequency=16, scaling=10.0, target_modules=TARGETS, random_loc_seed=seed),
                       dtype, seed)


def tiny_oft_llama(dtype=torch.float64, seed=0):
    from peft import OFTConfig

    return _peft_llama(OFTConfig(r=0, oft_block_size=8, target_modules=TARGETS, module_dropout=0.0), dtype, seed)


def tiny_vera_llama(dtype=torch.float64, seed=0):
    from peft import VeraConfig

    return _peft_llama(VeraConfig(r=4, target_modules=TARGETS, vera_dropout=0.0, projection_prng_key=seed),
                       dtype, seed)


def tiny_boft_llama(dtype=torch.float64, seed=0):
    from peft import BOFTConfig

    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=TARGETS, boft_dropout=0.0)
    return _peft_llama(cfg, dtype, seed)


def tiny_ln_tuning_llama(dtype=torch.float64, seed=0):
    from peft import LNTuningConfig

    return _peft_llama(LNTuningConfig(task_type="CAUSAL_LM"), dtype, seed)


ZOO = {
    "mixtral": (tiny_mixtral, causal_batch, None),
    "mixtral_batched_mm": (lambda dtype=torch.float64: tiny_mixtral(dtype, experts="batched_mm"), causal_batch, None),
    "t5": (tiny_t5, t5_batch, None),
    "bart": (tiny_bart, bart_batch, None),
    "bart_same_len": (tiny_bart, bart_same_len_batch, None),
    "falcon": (tiny_falcon, causal_batch, None),
    "falcon_new_arch": (lambda dtype=torch.float64: tiny_falcon(dtype, new_arch=True), causal_batch, None),
    "qwen2": (tiny_qwen2, causal_batch, None),
    "gemma": (tiny_gemma, causal_batch, None),
    "gemma2": (tiny_gemma2, causal_batch, None),
    "mistral": (tiny_mistral, causal_batch, None),
    "gpt_neox": (tiny_gpt_neox, causal_batch, None),
    "bloom": (tiny_bloom, causal_batch, None),
    "mamba": (tiny_mamba, causal_batch, None),
    "vit": (tiny_vit, image_batch, None),
    "resnet": (tiny_resnet, image_batch, None),
    "ia3_llama": (tiny_ia3_llama, causal_batch, None),
    "ia3_ff_llama": (tiny_ia3_ff_llama, causal_batch, None),
    "dora_llama": (tiny_dora_llama, causal_batch, None),
    "loha_llama": (tiny_loha_llama, causal_batch, None),
    "lokr_llama": (tiny_lokr_llama, causal_batch, None),
    "adalora_llama": (tiny_adalora_llama, causal_batch, None),
    "fourierft_llama": (tiny_fourierft_llama, causal_batch, None),
    "oft_llama": (tiny_oft_llama, causal_batch, None),
    "vera_llama": (tiny_vera_llama, causal_batch, None),
    "boft_llama": (tiny_boft_llama, causal_batch, None),
    "ln_tuning_llama": (tiny_ln_tuning_llama, causal_batch, None),
}
