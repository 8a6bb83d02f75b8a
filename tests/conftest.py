import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    """Under pytest-xdist, each worker gets its share of the cores as torch threads.

    The suite runs one worker per core (run.sh); a worker that kept torch's default (all cores)
    would oversubscribe the machine and stall in OpenMP barriers. Tests that compare thread
    counts set theirs explicitly.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


CLI_REVIEWS = Path(__file__).parent / "data" / "cli" / "reviews.jsonl"


def _vocabulary() -> list[str]:
    words = {w for line in CLI_REVIEWS.read_text().splitlines() for w in json.loads(line)["text"].split()}
    return ["<pad>", "<unk>", "<s>", "</s>", "Review", ":", "It", "was", "terrible", "great", *sorted(words)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer over the CLI tests' reviews, as save_pretrained writes them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(_vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
