"""An index along the batch (``hidden[arange(B), last_token]``) picks each group's own rows.

LlamaForSequenceClassification pools the last real token with ``logits[arange(B), pos]``;
on the repeated batch those indices count only B rows, so a grouped copy of the index
gave every group group 0's logits: equal losses, no error. The rewrite runs such an
index once per group.
"""

import torch
from explicit import explicit_group_losses

import zo_fx


def test_sequence_classification_pooling_reads_every_groups_rows():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    seed = 0
    print(f"torch.manual_seed({seed}) for the weights and the token ids")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
                      attn_implementation="sdpa")
    model = LlamaForSequenceClassification(cfg).double().eval()
    ids = torch.randint(1, 96, (3, 7))
    ids[0, 5:] = 0  # a padded example: its last real token is not the last position
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([0, 1, 2])}
    zm = zo_fx.zo_compile(model, batch)
    table = zo_fx.GroupTable([5, 5, 0], [1.0, -1.0, 0.0], 1e-2)
    got = zm.group_losses(batch, table)
    ref = explicit_group_losses(model, zm, batch, table)
    assert not torch.equal(ref[0], ref[1]), "the perturbation must reach the loss for this test to mean anything"
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-10, f"max relative error {rel:.3e}\ngot {got}\nref {ref}"
