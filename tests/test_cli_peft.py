"""``zo-fx finetune --peft METHOD`` and ``--peft-config FILE`` beyond LoRA, prefix and prompt tuning.

For each method the contract is the one a user relies on: the run trains only the adapter, and the
``adapter/`` folder it writes, loaded with ``PeftModel.from_pretrained`` on the base model, scores
exactly what the run's final evaluation reported. A method zo_fx cannot train, or a config file
it cannot use, is refused before the model loads, with the reason and what to use instead.

The model is a tiny random Llama with a word-level tokenizer (as in test_cli.py), and each run is
two FZOO steps on a few examples: these tests check the plumbing, not that anything learns.
``-m slow`` runs the same check for every method ``--peft`` accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zo_fx.cli import main
from zo_fx.finetune import PEFTS
from zo_fx.finetune.peft_methods import REFUSED_PEFT

DATA = Path(__file__).parent / "data" / "cli"
REVIEWS = DATA / "reviews.jsonl"
WORDS = "pos=great,neg=terrible"
TEMPLATE = "Review: {text} It was"
#: a few steps on few examples, one thread: the plumbing, fast
QUICK = ("--batch-size", "4", "--max-length", "16", "--threads", "1", "--steps", "2", "--directions", "2",
         "--lr", "0.05", "--n-val", "8", "--n-test", "8")


# model_dir (tests/conftest.py): the CLI tests' tiny Llama and word-level tokenizer


def finetune(model_dir: Path, out: Path, *extra: str) -> dict:
    argv = ["finetune", "--model", str(model_dir), "--task", str(REVIEWS), "--label-words", WORDS, "--template",
            TEMPLATE, "--output-dir", str(out), *QUICK, *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def error_of(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    message = raised.value.code
    assert isinstance(message, str) and message.startswith("zo-fx finetune: error: "), message
    return message


def reloaded_scores(model_dir: Path, adapter: Path) -> dict:
    """Validation and test scores of ``PeftModel.from_pretrained(base, adapter)``, scored as the job scores."""
    from peft import PeftModel

    from zo_fx.finetune import FinetuneConfig, build_task, evaluate
    from zo_fx.finetune.loss import build_loss, fit_task
    from zo_fx.finetune.model import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(str(model_dir), torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    cfg = FinetuneConfig(model=str(model_dir), task=str(REVIEWS), label_words=WORDS, template=TEMPLATE,
                         max_length=16, n_val=8, n_test=8)
    task = fit_task(build_task(cfg), tokenizer, model)
    loss = build_loss(task, tokenizer, model)
    return {s: evaluate(model, task, tokenizer, loss, s, cfg.max_length) for s in ("validation", "test")}


def assert_reload_scores_as_the_run(model_dir: Path, out: Path, metrics: dict) -> None:
    final = metrics["final"]["fine_tuned"]
    got = reloaded_scores(model_dir, out / "adapter")
    for split in ("validation", "test"):
        assert got[split]["accuracy"] == final[split]["accuracy"], split
        assert got[split]["loss"] == pytest.approx(final[split]["loss"], rel=1e-6, abs=1e-9), split
    assert final["test"]["loss"] != metrics["final"]["zero_shot"]["test"]["loss"], "the run did not move the adapter"


# ---------------------------------------------------------------------------------------------------------
# methods by name


@pytest.mark.parametrize("method, peft_type", [("ia3", "IA3"), ("vera", "VERA"), ("dora", "LORA")])
def test_a_method_beyond_lora_trains_its_adapter_and_the_folder_reloads_to_the_runs_score(
        model_dir, tmp_path, method, peft_type):
    metrics = finetune(model_dir, tmp_path, "--peft", method)
    assert metrics["settings"]["peft"] == method
    assert metrics["model"]["trainable"] < metrics["model"]["parameters"] / 10
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type and saved["inference_mode"] is True
    if method == "dora":
        assert saved["use_dora"] is True
    if method == "ia3":  # PEFT's own Llama targets: key, value and the MLP's down projection (scaled on its input)
        assert set(saved["target_modules"]) == {"k_proj", "v_proj", "down_proj"}
        assert saved["feedforward_modules"] == ["down_proj"]
    assert_reload_scores_as_the_run(model_dir, tmp_path, metrics)


# ---------------------------------------------------------------------------------------------------------
# --peft-config


def test_peft_config_fields_replace_the_defaults_and_override_peft(model_dir, tmp_path, capsys):
    """A JSON of a config's fields (FourierFT with its own frequencies and targets) wins over --peft lora; the
    run's adapter carries those settings, reloads to the run's score, and ``zo-fx replay`` rebuilds it."""
    spec = {"peft_type": "FOURIERFT", "n_frequency": 48, "scaling": 50.0, "target_modules": ["q_proj", "o_proj"]}
    (tmp_path / "fourier.json").write_text(json.dumps(spec))
    metrics = finetune(model_dir, tmp_path / "run", "--peft", "lora", "--peft-config", str(tmp_path / "fourier.json"))
    assert metrics["settings"]["peft"] == "fourierft"
    assert metrics["settings"]["peft_fields"] == {k: v for k, v in spec.items() if k != "peft_type"}
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FOURIERFT" and saved["n_frequency"] == 48 and saved["scaling"] == 50.0
    assert set(saved["target_modules"]) == {"q_proj", "o_proj"}
    assert metrics["model"]["trainable"] == 48 * 2 * 2  # n_frequency per targeted layer, 2 layers x 2 modules
    assert_reload_scores_as_the_run(model_dir, tmp_path / "run", metrics)
    capsys.readouterr()
    assert main(["replay", str(tmp_path / "run"), "--output-dir", str(tmp_path / "replayed")]) == 0
    assert json.loads(capsys.readouterr().out)["identical_to_the_run"] is True


def test_a_saved_adapter_config_json_is_a_peft_config(model_dir, tmp_path):
    """An ``adapter_config.json`` as PEFT writes it (bookkeeping keys included) sets up the same method."""
    from peft import LoHaConfig

    LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"]).save_pretrained(tmp_path / "given")
    metrics = finetune(model_dir, tmp_path / "run", "--peft-config", str(tmp_path / "given" / "adapter_config.json"))
    assert metrics["settings"]["peft"] == "loha"
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LOHA" and saved["r"] == 2 and saved["alpha"] == 4
    assert set(saved["target_modules"]) == {"q_proj", "v_proj", "up_proj"}
    assert_reload_scores_as_the_run(model_dir, tmp_path / "run", metrics)


# ---------------------------------------------------------------------------------------------------------
# refusals (all before the model loads)


def _argv(out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(DATA / "no-such-model"), "--task", str(REVIEWS), "--label-words", WORDS,
            "--template", TEMPLATE, "--output-dir", str(out), "--steps", "1", *extra]


@pytest.mark.parametrize("method, phrases", [
    ("hra", ["not supported by zo_fx", "torch.export", "--peft oft"]),
    ("xlora", ["not supported by zo_fx", "already trained", "--peft lora"]),
    ("trainable_tokens", ["not supported by zo_fx", "--peft-config", "token_indices"]),
    ("nonsense", ["not a PEFT method zo_fx knows", "ia3", "vera", "--peft-config"]),
])
def test_an_unsupported_method_is_refused_with_the_reason_and_an_alternative(tmp_path, method, phrases):
    message = error_of(_argv(tmp_path, "--peft", method))
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("content, phrases", [
    ("{not json", ["is not valid JSON"]),
    ("[1, 2]", ["holds a JSON list", "peft_type"]),
    ('{"r": 4}', ["has no \"peft_type\""]),
    ('{"peft_type": "NOPE"}', ["peft_type 'NOPE' is not a PEFT method zo_fx knows", "IA3"]),
    ('{"peft_type": "LORA", "rank": 4}', ["LoraConfig has no field(s) 'rank'", "lora_alpha"]),
    ('{"peft_type": "VERA", "r": "four"}', ["VeraConfig.r must be a number; got 'four'"]),
    ('{"peft_type": "ADALORA", "total_step": 4, "tinit": 10}', ["AdaLoraConfig refuses these settings"]),
    ('{"peft_type": "IA3", "task_type": "SEQ_CLS"}', ["task_type 'SEQ_CLS'", "CAUSAL_LM"]),
    ('{"peft_type": "HRA", "r": 4}', ["torch.export", "--peft oft"]),
])
def test_a_bad_peft_config_file_is_refused_before_the_model_loads(tmp_path, content, phrases):
    (tmp_path / "cfg.json").write_text(content)
    message = error_of(_argv(tmp_path / "out", "--peft-config", str(tmp_path / "cfg.json")))
    assert "--peft-config" in message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


def test_a_missing_peft_config_file_is_named(tmp_path):
    assert "no such file" in error_of(_argv(tmp_path, "--peft-config", str(tmp_path / "absent.json")))


def test_a_method_whose_layers_gpt2_lacks_is_refused_with_the_methods_that_fit(tmp_path):
    """GPT-2 keeps its projections in Conv1D layers, which some PEFT methods have no layer for."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from zo_fx.finetune import FinetuneError
    from zo_fx.finetune.model import apply_peft

    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(FinetuneError, match="Conv1D") as raised:
        apply_peft(model, "oft", seed=0)
    assert "lora" in str(raised.value) and "ia3" in str(raised.value)
    assert apply_peft(model, "ia3", seed=0).peft_config["default"].target_modules  # a method that fits does


# ---------------------------------------------------------------------------------------------------------
# every method (-m slow)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in PEFTS if m != "none"])
def test_every_method_reloads_to_the_runs_score(model_dir, tmp_path, method):
    assert method not in REFUSED_PEFT
    metrics = finetune(model_dir, tmp_path, "--peft", method)
    assert metrics["settings"]["peft"] == method
    assert_reload_scores_as_the_run(model_dir, tmp_path, metrics)
