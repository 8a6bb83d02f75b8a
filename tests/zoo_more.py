"""More tiny random-initialised models for coverage probing (no files, no network).

Companion of :mod:`model_zoo`: the same style (float64, eval mode, dropout 0, hidden
size 16-32, 1-2 layers, ``VOCAB`` tokens where the family allows), more families and
more PEFT methods. Every entry of ``ZOO`` is ``name -> (make_model, make_batch, loss)``
where ``loss`` is ``None`` when :func:`zo_fx.losses.default_loss` knows the model class
(all entries: encoder-decoder LMs, Whisper included, get ``seq2seq_lm_loss``, masked LMs
``masked_lm_loss``, image and sequence classifiers ``sequence_classification_loss``) and a
per-example loss otherwise.

Families: Mixtral (MoE, 4 experts, top-2), T5 and BART (encoder-decoder; T5 also with LoRA),
Qwen3, BERT sequence classification with two segments (``token_type_ids``), GPT-2 sequence
classification on a right-padded batch (last-real-token pooling), Falcon (fused
qkv; old and new decoder architecture), Qwen2, Gemma, Gemma2, Mistral, GPT-NeoX, BLOOM
(ALiBi), Mamba (depthwise conv1d + selective scan), ViT and ResNet (``pixel_values``);
Phi3 (fused ``qkv_proj`` sliced into q/k/v, fused ``gate_up_proj``), OLMoE (MoE with q/k
norms and an active ``clip_qkv`` clamp) and Qwen2-MoE (routed experts + a sigmoid-gated
shared expert), GPT-J (parallel block, partial interleaved rotary) and CodeGen (fused qkv
in 4 interleaved blocks), DeBERTa-v2 (masked LM, disentangled relative attention, conv
branch), ALBERT (masked LM, one layer's weights shared by 3 layers, factorised
embeddings), DistilBERT (masked LM), Whisper (encoder-decoder on ``input_features``),
ConvNeXt and CLIP's vision tower (image classifiers), and a partially frozen Llama (only
its second layer trainable).

PEFT methods, on model_zoo's tiny untied Llama unless said otherwise, targeting
``q_proj``/``v_proj`` where the method takes target modules: IA3 (plus a feed-forward IA3
on ``down_proj``, which scales the layer's input instead of its output), DoRA, LoHa,
LoKr, AdaLoRA, FourierFT, OFT, VeRA, BOFT, LN tuning, P-tuning (MLP prompt encoder),
LLaMA-Adapter (adaption prompt), trainable tokens (a few embedding rows), HRA, VB-LoRA,
C3A, RoAd, SHiRA and MiSS; LoRA on GPT-2's Conv1D layers (``fan_in_fan_out=True``), and
LoRA + ``modules_to_save`` (a trainable copy of the ``score`` head) on a
sequence-classification Llama. LoRA, prompt and prefix tuning on the Llama are in
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
BART, ViT, ALBERT and DistilBERT attention adds a constant to every score of a query's
softmax row, so it never changes the output; CLIPForImageClassification classifies the
mean patch token of the vision tower's last hidden state, so the tower's
``post_layernorm`` (used only by its pooled output) never reaches the logits.
``benchmarks/coverage_probe.py --reach`` lists such tensors.

Entries torch.export itself cannot capture (a plain ``torch.export.export`` of the model
fails the same way): HRA and SHiRA read the frozen base weight through ``.weight.data``
inside ``forward``, which export lifts as a fake-tensor constant.

Not built here: Mixtral's default experts implementation ("grouped_mm") has no float64
CPU kernel, so the zoo uses "eager" (``mixtral``) and "batched_mm" (``mixtral_batched_mm``);
the same holds for OLMoE and Qwen2-MoE, which use "batched_mm". Gemma2 has no sdpa
attention, so it uses eager attention. Mamba's logits are float32.
"""

from __future__ import annotations

import torch
from model_zoo import VOCAB, _roberta_config, causal_batch, mlm_batch, tiny_gpt2, tiny_llama

IMAGE_SIZE = 16
NUM_LABELS = 3
WHISPER_MELS = 8
WHISPER_FRAMES = 8  # encoder positions; input_features have twice as many frames


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



# ---- more families ---------------------------------------------------------------------------------------


def whisper_batch(batch_size=3, seed=0, dtype=torch.float64):
    """Log-mel-like ``input_features`` ``[N, WHISPER_MELS, 2 * WHISPER_FRAMES]`` (the encoder's convolutions halve
    the frames) + a teacher-forced decoder; example 0 right-padded on the decoder side (Whisper has no encoder mask)."""
    b = seq2seq_batch(batch_size, seed=seed, decoder_start=2)
    g = torch.Generator().manual_seed(seed + 1)
    feats = torch.randn(batch_size, WHISPER_MELS, 2 * WHISPER_FRAMES, generator=g, dtype=torch.float64).to(dtype)
    return {"input_features": feats, "decoder_input_ids": b["decoder_input_ids"],
            "decoder_attention_mask": b["decoder_attention_mask"], "labels": b["labels"]}


def padded_cls_batch(batch_size=3, seq_len=7, seed=0, pad_token_id=0):
    """Sequence classification; example 0 right-padded with ``pad_token_id`` (decoder classifiers read the last
    non-pad token, a data-dependent position)."""
    b = causal_batch(batch_size, seq_len, seed, pad_tail=True)
    b["input_ids"][b["attention_mask"] == 0] = pad_token_id
    b["labels"] = torch.arange(batch_size) % NUM_LABELS
    return b



def tiny_phi3(dtype=torch.float64, seed=0):
    """Fused ``qkv_proj`` (q 32 + k 16 + v 16 rows, sliced per head group) and fused ``gate_up_proj`` (chunked)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = Phi3Config(**_DECODER, resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     sliding_window=None)
    return _finish(Phi3ForCausalLM(cfg), dtype)


def tiny_olmoe(dtype=torch.float64, seed=0, experts="batched_mm"):
    """4 experts, top-2, q/k RMS norms, ``clip_qkv`` small enough that the clamp is active. "batched_mm": see
    :func:`tiny_mixtral` (eager experts are data-dependent; grouped_mm has no float64 CPU kernel)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoeConfig(**_DECODER, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=0.15,
                      pad_token_id=1, bos_token_id=None, eos_token_id=2, experts_implementation=experts)
    return _finish(OlmoeForCausalLM(cfg), dtype)


def tiny_qwen2_moe(dtype=torch.float64, seed=0, experts="batched_mm"):
    """4 routed experts (top-2, renormalised) plus a shared expert behind a sigmoid gate; qkv biases."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(**_DECODER, moe_intermediate_size=24, shared_expert_intermediate_size=48, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                         use_sliding_window=False, qkv_bias=True, experts_implementation=experts)
    return _finish(Qwen2MoeForCausalLM(cfg), dtype)


def tiny_gptj(dtype=torch.float64, seed=0):
    """Parallel attention + MLP behind one layer norm, rotary on the first 4 of 8 head dims (interleaved)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(seed)
    cfg = GPTJConfig(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=48,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    return _finish(GPTJForCausalLM(cfg), dtype)


def tiny_codegen(dtype=torch.float64, seed=0):
    """One fused ``qkv_proj`` split in 4 "model-parallel" blocks, each holding a slice of q, v and k (in that order)."""
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.manual_seed(seed)
    cfg = CodeGenConfig(vocab_size=VOCAB, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                        n_inner=48, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    return _finish(CodeGenForCausalLM(cfg), dtype)


def tiny_deberta_v2(dtype=torch.float64, seed=0):
    """Masked LM with disentangled relative attention (c2p + p2c, log buckets, shared key projection, layer-normed
    relative embeddings), no absolute positions, and the convolution branch after the first layer."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    torch.manual_seed(seed)
    cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          max_position_embeddings=64, type_vocab_size=0, relative_attention=True,
                          max_relative_positions=16, position_buckets=8, pos_att_type=["p2c", "c2p"],
                          position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
                          conv_kernel_size=3, conv_act="gelu", pad_token_id=0)
    return _finish(DebertaV2ForMaskedLM(cfg), dtype)


def tiny_albert(dtype=torch.float64, seed=0):
    """Masked LM; factorised embeddings (16 -> 32) and ONE layer's weights applied 3 times (shared layers)."""
    from transformers import AlbertConfig, AlbertForMaskedLM

    torch.manual_seed(seed)
    cfg = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_hidden_groups=1,
                       inner_group_num=1, num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    return _finish(AlbertForMaskedLM(cfg), dtype)


def tiny_distilbert(dtype=torch.float64, seed=0):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=64, n_layers=2, n_heads=4, dim=32,
                           hidden_dim=48, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                           attn_implementation="sdpa")
    return _finish(DistilBertForMaskedLM(cfg), dtype)


def tiny_whisper(dtype=torch.float64, seed=0):
    """Encoder-decoder on ``input_features`` (two conv1d + sinusoidal positions), LM head tied to the decoder
    embeddings."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=WHISPER_MELS, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, d_model=32, encoder_ffn_dim=48,
                        decoder_ffn_dim=48, max_source_positions=WHISPER_FRAMES, max_target_positions=16,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                        decoder_layerdrop=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                        decoder_start_token_id=2, suppress_tokens=None, begin_suppress_tokens=None,
                        apply_spec_augment=False, use_cache=False, attn_implementation="sdpa")
    return _finish(WhisperForConditionalGeneration(cfg), dtype)


def tiny_convnext(dtype=torch.float64, seed=0):
    """Depthwise 7x7 convolutions, channels-first and channels-last layer norms, per-channel layer scale (1.0, not
    the default 1e-6 that would make every block nearly the identity)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(seed)
    cfg = ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                         layer_scale_init_value=1.0, drop_path_rate=0.0, image_size=IMAGE_SIZE, num_labels=NUM_LABELS)
    return _finish(ConvNextForImageClassification(cfg), dtype)


def tiny_clip_vision(dtype=torch.float64, seed=0):
    """CLIP's vision tower (class token, pre-layernorm, quick-GELU) + a linear head on the mean patch token."""
    from transformers import CLIPConfig, CLIPForImageClassification

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
                  image_size=IMAGE_SIZE, patch_size=4, attention_dropout=0.0)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16)
    cfg = CLIPConfig(text_config=text, vision_config=vision, num_labels=NUM_LABELS, attn_implementation="sdpa")
    return _finish(CLIPForImageClassification(cfg), dtype)


def tiny_partially_frozen_llama(dtype=torch.float64, seed=0):
    """model_zoo's untied Llama with only its second decoder layer trainable (embeddings, layer 0, final norm and
    LM head frozen)."""
    model = tiny_llama(dtype, tied=False, seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.1."))
    return model


# ---- more PEFT methods --------------------------------------------------------------------------------------


def tiny_lora_gpt2(dtype=torch.float64, seed=0):
    """LoRA on GPT-2's Conv1D layers (weight stored [in, out]: ``fan_in_fan_out=True``): c_attn, both c_proj, c_fc."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                     lora_dropout=0.0)
    model = get_peft_model(tiny_gpt2(dtype, seed=seed), cfg)
    jitter_trainable(model, seed + 1)
    return model.to(dtype).eval()


def tiny_lora_cls_llama(dtype=torch.float64, seed=0):
    """Sequence-classification Llama (``pad_token_id`` 0: it reads the last non-pad token) with LoRA on q/v and a
    trainable copy of the ``score`` head (``modules_to_save``; the original head stays frozen)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    base_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                           max_position_embeddings=64, num_labels=NUM_LABELS, pad_token_id=0)
    base = _finish(LlamaForSequenceClassification(base_cfg), dtype)
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                     modules_to_save=["score"])
    model = get_peft_model(base, cfg)
    jitter_trainable(model, seed + 1)
    return model.to(dtype).eval()


def tiny_ptuning_llama(dtype=torch.float64, seed=0):
    """P-tuning: 3 virtual tokens produced by an MLP prompt encoder (its weights are what is trained)."""
    from peft import PromptEncoderConfig

    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_reparameterization_type="MLP",
                              encoder_hidden_size=16, encoder_dropout=0.0)
    return _peft_llama(cfg, dtype, seed)


def tiny_adaption_prompt_llama(dtype=torch.float64, seed=0):
    """LLaMA-Adapter: learned adapter prompts attended through a zero-init gate in the last layer."""
    from peft import AdaptionPromptConfig

    return _peft_llama(AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1), dtype, seed)


def trainable_token_ids():
    """The first token of each example of :func:`causal_batch` (so every example reads a trainable embedding row)."""
    ids = causal_batch()["input_ids"]
    return sorted({int(t) for t in ids[:, 0]})


def tiny_trainable_tokens_llama(dtype=torch.float64, seed=0):
    """Trainable tokens: only a few rows of the input embedding are trainable (a sparse delta on a frozen table)."""
    from peft import TrainableTokensConfig

    cfg = TrainableTokensConfig(token_indices=trainable_token_ids(), target_modules=["embed_tokens"])
    return _peft_llama(cfg, dtype, seed)


def tiny_hra_llama(dtype=torch.float64, seed=0):
    """HRA: the weight times a product of r Householder reflections."""
    from peft import HRAConfig

    return _peft_llama(HRAConfig(r=4, target_modules=TARGETS), dtype, seed)


def tiny_vblora_llama(dtype=torch.float64, seed=0):
    """VB-LoRA: LoRA factors assembled from a shared vector bank by a top-2 softmax over trainable logits."""
    from peft import VBLoRAConfig

    cfg = VBLoRAConfig(r=4, num_vectors=16, vector_length=8, topk=2, target_modules=TARGETS, vblora_dropout=0.0)
    return _peft_llama(cfg, dtype, seed)


def tiny_c3a_llama(dtype=torch.float64, seed=0):
    """C3A: a block-circulant delta applied by FFT."""
    from peft import C3AConfig

    return _peft_llama(C3AConfig(block_size=8, target_modules=TARGETS), dtype, seed)


def tiny_road_llama(dtype=torch.float64, seed=0):
    """RoAd: 2D rotations (scaled) of pairs of output features."""
    from peft import RoadConfig

    return _peft_llama(RoadConfig(variant="road_2", group_size=8, target_modules=TARGETS), dtype, seed)


def tiny_shira_llama(dtype=torch.float64, seed=0):
    """SHiRA: a sparse trainable delta on a fixed random mask of the weight."""
    from peft import ShiraConfig

    return _peft_llama(ShiraConfig(r=4, random_seed=seed, target_modules=TARGETS), dtype, seed)


def tiny_miss_llama(dtype=torch.float64, seed=0):
    """MiSS: one shared trainable shard, expanded over the weight's rows."""
    from peft import MissConfig

    return _peft_llama(MissConfig(r=4, miss_dropout=0.0, target_modules=TARGETS), dtype, seed)


def tiny_t5_lora(dtype=torch.float64, seed=0):
    """PEFT LoRA on an encoder-decoder: T5's q and v in the encoder, the decoder and the cross-attention."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_t5(dtype, seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    return jitter_trainable(model, seed + 1).to(dtype).eval()


def tiny_bert_cls(dtype=torch.float64, seed=0):
    """BERT sequence classification; its batch carries token_type_ids (two segments)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, num_labels=NUM_LABELS, type_vocab_size=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return _finish(BertForSequenceClassification(cfg), dtype)


def segment_batch(batch_size=3, seq_len=7, seed=0):
    """A right-padded batch with two segments (token_type_ids) and class labels."""
    b = causal_batch(batch_size, seq_len, seed)
    segments = (torch.arange(seq_len) >= seq_len // 2).long().expand(batch_size, seq_len).contiguous()
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "token_type_ids": segments,
            "labels": torch.arange(batch_size) % NUM_LABELS}


def class_batch(batch_size=3, seq_len=7, seed=0):
    """A right-padded batch with class labels (the sequence classifiers pool the last real token)."""
    b = causal_batch(batch_size, seq_len, seed)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
            "labels": torch.arange(batch_size) % NUM_LABELS}


def tiny_gpt2_cls(dtype=torch.float64, seed=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, num_labels=NUM_LABELS, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return _finish(GPT2ForSequenceClassification(cfg), dtype)


def tiny_qwen3(dtype=torch.float64, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return _finish(Qwen3ForCausalLM(Qwen3Config(**_DECODER, head_dim=8)), dtype)


# ---- outputs beyond logits, models that write on themselves during forward


def tiny_roberta_qa(dtype=torch.float64, seed=0):
    """Span QA: the output has start_logits and end_logits, no logits."""
    from transformers import RobertaForQuestionAnswering

    torch.manual_seed(seed)
    cfg = _roberta_config()
    cfg.num_labels = 2  # a start and an end score per token
    return _finish(RobertaForQuestionAnswering(cfg), dtype)


def span_batch(batch_size=3, seq_len=7, seed=0):
    """A right-padded batch with answer spans; the last example's span lies past the sequence (ignored)."""
    b = causal_batch(batch_size, seq_len, seed)
    g = torch.Generator().manual_seed(seed + 1)
    start = torch.randint(0, seq_len - 2, (batch_size,), generator=g)
    end = start + torch.randint(0, 2, (batch_size,), generator=g)
    start[-1], end[-1] = seq_len + 3, seq_len + 4
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "start_positions": start,
            "end_positions": end}


CHOICES = 4


def tiny_bert_multiple_choice(dtype=torch.float64, seed=0):
    """Multiple choice: inputs [B, choices, T], logits [B, choices]."""
    from transformers import BertConfig, BertForMultipleChoice

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _finish(BertForMultipleChoice(cfg), dtype)


def choice_batch(batch_size=3, seq_len=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, CHOICES, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[:, :, -1] = 0  # a padded last position in every choice
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch_size) % CHOICES}


def tiny_funnel(dtype=torch.float64, seed=0):
    """Funnel keeps the last forward's sequence length on its attention structure (written during forward)."""
    from transformers import FunnelConfig, FunnelForSequenceClassification

    torch.manual_seed(seed)
    cfg = FunnelConfig(vocab_size=VOCAB, block_sizes=[1, 1], d_model=32, n_head=4, d_head=8, d_inner=48,
                       num_labels=NUM_LABELS, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return _finish(FunnelForSequenceClassification(cfg), dtype)


def tiny_electra_regression(dtype=torch.float64, seed=0):
    """A two-target regression head (problem_type="regression"): float labels, squared error."""
    from transformers import ElectraConfig, ElectraForSequenceClassification

    torch.manual_seed(seed)
    cfg = ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, num_labels=2, problem_type="regression",
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _finish(ElectraForSequenceClassification(cfg), dtype)


def regression_batch(batch_size=3, seq_len=7, seed=0):
    b = class_batch(batch_size, seq_len, seed)
    g = torch.Generator().manual_seed(seed + 2)
    b["labels"] = torch.randn(batch_size, 2, generator=g, dtype=torch.float64)
    return b


def tiny_granite(dtype=torch.float64, seed=0):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    return _finish(GraniteForCausalLM(GraniteConfig(**_DECODER, residual_multiplier=0.5, logits_scaling=2.0,
                                                    embedding_multiplier=3.0)), dtype)


def tiny_stablelm(dtype=torch.float64, seed=0):
    from transformers import StableLmConfig, StableLmForCausalLM

    torch.manual_seed(seed)
    return _finish(StableLmForCausalLM(StableLmConfig(**_DECODER, partial_rotary_factor=0.5)), dtype)


def tiny_rwkv(dtype=torch.float64, seed=0):
    """RWKV rescales its own output weights on its first eval forward (zo_compile settles it first)."""
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(seed)
    cfg = RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                     intermediate_size=64, context_length=16, rescale_every=1)
    return _finish(RwkvForCausalLM(cfg), dtype)


def unmasked_batch(batch_size=3, seq_len=7, seed=0):
    """A causal batch without attention_mask, for models that take one and ignore it (RWKV)."""
    b = causal_batch(batch_size, seq_len, seed, pad_tail=False)
    return {"input_ids": b["input_ids"], "labels": b["labels"]}


ZOO = {
    "rwkv": (tiny_rwkv, unmasked_batch, None),
    "roberta_span_qa": (tiny_roberta_qa, span_batch, None),
    "bert_multiple_choice": (tiny_bert_multiple_choice, choice_batch, None),
    "funnel_cls": (tiny_funnel, class_batch, None),
    "electra_regression": (tiny_electra_regression, regression_batch, None),
    "granite": (tiny_granite, causal_batch, None),
    "stablelm": (tiny_stablelm, causal_batch, None),
    "mixtral": (tiny_mixtral, causal_batch, None),
    "t5_lora": (tiny_t5_lora, t5_batch, None),
    "bert_cls_segments": (tiny_bert_cls, segment_batch, None),
    "gpt2_cls_padded": (tiny_gpt2_cls, class_batch, None),
    "qwen3": (tiny_qwen3, causal_batch, None),
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
    # ---- more families
    "phi3": (tiny_phi3, causal_batch, None),
    "olmoe_batched_mm": (tiny_olmoe, causal_batch, None),
    "qwen2_moe_batched_mm": (tiny_qwen2_moe, causal_batch, None),
    "gptj": (tiny_gptj, causal_batch, None),
    "codegen": (tiny_codegen, causal_batch, None),
    "deberta_v2": (tiny_deberta_v2, mlm_batch, None),
    "albert": (tiny_albert, mlm_batch, None),
    "distilbert": (tiny_distilbert, mlm_batch, None),
    "whisper": (tiny_whisper, whisper_batch, None),
    "convnext": (tiny_convnext, image_batch, None),
    "clip_vision": (tiny_clip_vision, image_batch, None),
    "partially_frozen_llama": (tiny_partially_frozen_llama, causal_batch, None),
    # ---- more PEFT methods
    "lora_gpt2": (tiny_lora_gpt2, causal_batch, None),
    "lora_cls_llama": (tiny_lora_cls_llama, padded_cls_batch, None),
    "ptuning_llama": (tiny_ptuning_llama, causal_batch, None),
    "adaption_prompt_llama": (tiny_adaption_prompt_llama, causal_batch, None),
    "trainable_tokens_llama": (tiny_trainable_tokens_llama, causal_batch, None),
    "hra_llama": (tiny_hra_llama, causal_batch, None),
    "vblora_llama": (tiny_vblora_llama, causal_batch, None),
    "c3a_llama": (tiny_c3a_llama, causal_batch, None),
    "road_llama": (tiny_road_llama, causal_batch, None),
    "shira_llama": (tiny_shira_llama, causal_batch, None),
    "miss_llama": (tiny_miss_llama, causal_batch, None),
}
