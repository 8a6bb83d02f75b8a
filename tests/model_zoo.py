"""Tiny random-initialised models of each family the compiler must handle (no files, no network)."""

from __future__ import annotations

import torch

VOCAB = 96


def _finish(model, dtype):
    model = model.to(dtype).eval()
    return model


def tiny_llama(dtype=torch.float64, tied=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      attn_implementation="sdpa", max_position_embeddings=64)
    return _finish(LlamaForCausalLM(cfg), dtype)


def tiny_opt(dtype=torch.float64, seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, layerdrop=0.0, attn_implementation="sdpa")
    return _finish(OPTForCausalLM(cfg), dtype)


def tiny_gpt2(dtype=torch.float64, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    return _finish(GPT2LMHeadModel(cfg), dtype)


def _roberta_config():
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=70, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, type_vocab_size=1, attn_implementation="sdpa",
                         pad_token_id=1, num_labels=3)


def tiny_roberta_mlm(dtype=torch.float64, seed=0):
    from transformers import RobertaForMaskedLM

    torch.manual_seed(seed)
    return _finish(RobertaForMaskedLM(_roberta_config()), dtype)


def tiny_roberta_cls(dtype=torch.float64, seed=0):
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(seed)
    return _finish(RobertaForSequenceClassification(_roberta_config()), dtype)


def tiny_phi(dtype=torch.float64, seed=0):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=64,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, attn_implementation="sdpa")
    return _finish(PhiForCausalLM(cfg), dtype)


def tiny_lora_llama(dtype=torch.float64, seed=0):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(dtype, tied=False, seed=seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at zero; make it non-zero so both factors matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.to(dtype).eval()


def tiny_prompt_tuning_llama(dtype=torch.float64, seed=0):
    from peft import PromptTuningConfig, get_peft_model

    base = tiny_llama(dtype, tied=False, seed=seed)
    return get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).to(dtype).eval()


def tiny_prefix_tuning_llama(dtype=torch.float64, seed=0):
    from peft import PrefixTuningConfig, get_peft_model

    base = tiny_llama(dtype, tied=False, seed=seed)
    return get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).to(dtype).eval()


def causal_batch(batch_size=3, seq_len=7, seed=0, pad_tail=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    labels = ids.clone()
    if pad_tail and batch_size > 1:
        mask[0, seq_len - 2:] = 0
        labels[0, seq_len - 2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mlm_batch(batch_size=3, seq_len=7, seed=0):
    b = causal_batch(batch_size, seq_len, seed, pad_tail=False)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, 2] = b["input_ids"][:, 2]
    labels[:, 4] = b["input_ids"][:, 4]
    b["input_ids"][:, 2] = 3  # "mask" token
    b["labels"] = labels
    return b


def cls_batch(batch_size=3, seq_len=7, seed=0):
    b = causal_batch(batch_size, seq_len, seed, pad_tail=False)
    b["labels"] = torch.arange(batch_size) % 3
    return b


FAMILIES = {
    "llama_tied": (tiny_llama, causal_batch),
    "llama_untied": (lambda dtype=torch.float64: tiny_llama(dtype, tied=False), causal_batch),
    "opt": (tiny_opt, causal_batch),
    "gpt2": (tiny_gpt2, causal_batch),
    "roberta_mlm": (tiny_roberta_mlm, mlm_batch),
    "roberta_cls": (tiny_roberta_cls, cls_batch),
    "phi": (tiny_phi, causal_batch),
    "lora_llama": (tiny_lora_llama, causal_batch),
}
