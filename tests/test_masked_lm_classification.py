"""Prompt-based classification for masked LMs, and in-context demonstrations.

FZOO's and MeZO's RoBERTa setting: the prompt holds a mask token where the label word goes and
the loss compares the label words' logits at that token. The model here is a tiny random BERT
with a word-level tokenizer built from the review file's words (every word, [MASK] included,
one token), saved as ``save_pretrained`` writes it, so the CLI loads it as a user's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zo_fx
from tests.close import assert_rel_close
from tests.explicit import explicit_group_losses
from zo_fx.cli import main
from zo_fx.tasks.base import ClassificationTask, Example
from zo_fx.tasks.jsonl import load_jsonl_task

DATA = Path(__file__).parent / "data" / "cli"
REVIEWS = DATA / "reviews.jsonl"
WORDS = {"neg": " terrible", "pos": " great"}
TEMPLATE = "Review: {text} It was"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {w for line in REVIEWS.read_text().splitlines() for w in json.loads(line)["text"].split()}
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(
        [*specials, "Review", ":", "It", "was", "terrible", "great", "\n", *sorted(words)]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BertForMaskedLM and its tokenizer, saved as save_pretrained writes them."""
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _task() -> ClassificationTask:
    return load_jsonl_task(REVIEWS, label_words=WORDS, template=TEMPLATE)


def test_a_masked_lm_prompt_puts_one_mask_where_the_label_word_goes():
    tokenizer = _tokenizer()
    task = _task().for_masked_lm(tokenizer)
    examples = task.train[:3]
    batch = task.encode(tokenizer, examples, max_length=32)
    for row, mask, example in zip(batch["input_ids"], batch["attention_mask"], examples):
        tokens = tokenizer.convert_ids_to_tokens(row[: int(mask.sum())].tolist())
        expected = ["[CLS]", *tokenizer.tokenize(task.prompt(example)), "[MASK]", "[SEP]"]
        assert tokens == expected


def test_truncation_keeps_the_mask_and_the_closing_token():
    tokenizer = _tokenizer()
    task = _task().for_masked_lm(tokenizer)
    batch = task.encode(tokenizer, task.train[:4], max_length=8)
    for row in batch["input_ids"]:
        tokens = tokenizer.convert_ids_to_tokens(row.tolist())
        assert tokens[0] == "[CLS]" and tokens[-2:] == ["[MASK]", "[SEP]"] and tokens[-3] == "was"


def test_masked_candidate_loss_matches_explicitly_perturbed_bert_in_float64(bert_dir):
    from transformers import AutoModelForMaskedLM

    tokenizer = _tokenizer()
    task = _task().for_masked_lm(tokenizer)
    model = AutoModelForMaskedLM.from_pretrained(bert_dir, dtype=torch.float64).eval()
    batch = task.encode(tokenizer, task.train[:4], max_length=24)
    loss = zo_fx.MaskedCandidateLoss(task.label_token_ids(tokenizer), task.mask_token_id)
    zm = zo_fx.zo_compile(model, batch, loss=loss)
    table = zo_fx.GroupTable(torch.tensor([5, 5, 8]), torch.tensor([1.0, -1.0, 0.5]), 1e-2)
    got = zm.group_losses(batch, table)
    expected = explicit_group_losses(model, zm, batch, table, loss)
    assert_rel_close(got, expected, 1e-10)
    assert not torch.allclose(got[0], got[2]), "the perturbation reaches the loss"


def test_the_loss_reads_the_mask_position_not_the_last_token(bert_dir):
    from transformers import AutoModelForMaskedLM

    tokenizer = _tokenizer()
    task = _task().for_masked_lm(tokenizer)
    model = AutoModelForMaskedLM.from_pretrained(bert_dir).eval()
    batch = task.encode(tokenizer, task.train[:4], max_length=24)
    ids = task.label_token_ids(tokenizer)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pos = (batch["input_ids"] == tokenizer.mask_token_id).nonzero()[:, 1]
    by_hand = torch.nn.functional.cross_entropy(logits[torch.arange(4), pos][:, ids], batch["class_labels"],
                                                reduction="none")
    torch.testing.assert_close(zo_fx.MaskedCandidateLoss(ids, task.mask_token_id)(logits, batch), by_hand)


def test_a_prompt_without_exactly_one_mask_is_an_error():
    loss = zo_fx.MaskedCandidateLoss([5, 6], mask_token_id=4)
    batch = {"input_ids": torch.tensor([[2, 7, 4, 3], [2, 7, 8, 3]]), "class_labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="example 1 of the batch has 0 mask tokens"):
        loss.readout_positions(batch)


def test_cli_fine_tunes_a_masked_lm_and_saves_it_as_one(bert_dir, tmp_path):
    from transformers import AutoModelForMaskedLM

    args = ["finetune", "--model", str(bert_dir), "--task", str(REVIEWS), "--label-words", "neg=terrible,pos=great",
            "--template", TEMPLATE, "--batch-size", "4", "--max-length", "24", "--steps", "3",
            "--directions", "3", "--output-dir", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"]["masked_lm"] is True
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3]
    for phase in ("zero_shot", "fine_tuned"):
        assert 0.0 <= metrics["final"][phase]["test"]["accuracy"] <= 1.0
    saved = AutoModelForMaskedLM.from_pretrained(tmp_path / "model")
    assert type(saved).__name__ == "BertForMaskedLM"
    base = AutoModelForMaskedLM.from_pretrained(bert_dir)
    moved = [n for n, p in saved.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert moved, "three FZOO steps moved the weights"
    evaluated = json.loads(_eval_output(tmp_path / "model"))
    assert evaluated["results"][1]["accuracy"] == metrics["final"]["fine_tuned"]["test"]["accuracy"]


def _eval_output(folder: Path, *extra: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", "--model", str(folder), "--task", str(REVIEWS), "--label-words", "neg=terrible,pos=great",
                     "--template", TEMPLATE, "--max-length", "24", *extra]) == 0
    return out.getvalue()


def test_prefix_tuning_a_masked_lm_is_refused_with_advice(bert_dir, tmp_path):
    with pytest.raises(SystemExit, match="masked LM: use --peft lora"):
        main(["finetune", "--model", str(bert_dir), "--task", str(REVIEWS), "--label-words", "neg=terrible,pos=great",
              "--template", TEMPLATE, "--peft", "prefix", "--steps", "1", "--max-length", "24",
              "--output-dir", str(tmp_path)])


def test_lora_on_a_masked_lm_trains_the_adapter_and_evaluates_it_as_trained(bert_dir, tmp_path):
    args = ["finetune", "--model", str(bert_dir), "--task", str(REVIEWS), "--label-words", "neg=terrible,pos=great",
            "--template", TEMPLATE, "--batch-size", "4", "--max-length", "24", "--steps", "2", "--peft", "lora",
            "--directions", "2", "--output-dir", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    evaluated = json.loads(_eval_output(tmp_path / "adapter", "--base-model", str(bert_dir)))
    assert evaluated["results"][1]["accuracy"] == metrics["final"]["fine_tuned"]["test"]["accuracy"]


# ---------------------------------------------------------------------------------------------------------
# in-context demonstrations


def test_demonstrations_are_k_solved_training_examples_before_every_prompt():
    task = _task()
    shown = task.with_demonstrations(3, seed=1)
    shots = shown.demonstrations.split("\n\n")[:-1]
    assert len(shots) == 3
    solved = {task.template.format_map(e.fields) + task.label_words[e.label] for e in task.train}
    assert set(shots) <= solved
    for split in ("train", "validation", "test"):
        example = getattr(task, split)[0]
        assert shown.prompt(example) == shown.demonstrations + task.prompt(example)
    assert shown.with_demonstrations(0, seed=1) is shown
    assert task.with_demonstrations(3, seed=1).demonstrations == shown.demonstrations, "fixed by the seed"
    assert task.with_demonstrations(3, seed=2).demonstrations != shown.demonstrations
    assert shown.fingerprint() != task.fingerprint(), "a resumed run must show the same demonstrations"


def test_more_demonstrations_than_training_examples_is_an_error():
    task = ClassificationTask("tiny", "{t} is", [" a", " b"],
                              train=[Example({"t": "x"}, 0), Example({"t": "y"}, 1)])
    with pytest.raises(ValueError, match="2 demonstrations need more than 2 training examples"):
        task.with_demonstrations(2, seed=0)


def test_cli_records_the_demonstrations_it_trained_with(bert_dir, tmp_path):
    args = ["finetune", "--model", str(bert_dir), "--task", str(REVIEWS), "--label-words", "neg=terrible,pos=great",
            "--template", TEMPLATE, "--batch-size", "4", "--max-length", "48", "--steps", "1",
            "--directions", "2", "--demonstrations", "2", "--output-dir", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"]["demonstrations"] == _task().with_demonstrations(2, seed=0).demonstrations
    assert metrics["settings"]["demonstrations"] == 2
