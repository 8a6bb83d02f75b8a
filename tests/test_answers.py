"""Answer tasks: trained on the gold answer's cross-entropy, evaluated by greedy decoding with EM and F1."""

from __future__ import annotations

import json

import pytest
import torch

import zo_fx
from zo_fx.cli import main
from zo_fx.tasks.answers import answers_from_jsonl, encode_answers, example_of, is_answer_file

QUESTIONS = [(f"Review : {w} {i} It was", "great" if w in ("good", "fine", "nice") else "terrible")
             for i, w in enumerate(["good", "bad", "fine", "awful", "nice", "dull"] * 7)]


def _jsonl(tmp_path, rows) -> str:
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_the_loss_is_the_eager_per_example_cross_entropy_of_the_gold_answer(model_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    examples = [{"prompt": p, "answers": [a, "x"]} for p, a in QUESTIONS[:3]]
    examples[1]["prompt"] = "Review : a much longer prompt than the others here It was"
    batch = encode_answers(tokenizer, examples, max_length=24)
    zm = zo_fx.zo_compile(model, batch)
    ours = zm.group_losses(batch, zo_fx.GroupTable([0], [0.0], 1e-3))[0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, e in enumerate(examples):
        answer = tokenizer(" " + e["answers"][0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        start = int(batch["attention_mask"][i].sum()) - len(answer)
        logp = logits[i, start - 1:start - 1 + len(answer)].log_softmax(-1)
        expected = -logp[torch.arange(len(answer)), torch.tensor(answer)].mean()
        assert float(ours[i]) == pytest.approx(float(expected), rel=1e-10)
        assert batch["labels"][i, :start].eq(-100).all(), "the prompt is masked"


def test_answer_rows_take_a_prompt_or_a_context_and_question(tmp_path):
    row = example_of({"context": "Paris is in France.", "question": "Where is Paris?", "answers": {"text": [
        "France"], "answer_start": [12]}, "id": 7}, "row 1")
    assert row["prompt"] == "Paris is in France.\nQuestion: Where is Paris?\nAnswer:" and row["answers"] == ["France"]
    assert row["id"] == 7
    with pytest.raises(ValueError, match="answers"):
        example_of({"prompt": "p"}, "row 2")
    path = _jsonl(tmp_path, [{"prompt": p, "answers": [a]} for p, a in QUESTIONS])
    assert is_answer_file(path) and not is_answer_file(str(tmp_path / "missing.jsonl"))
    task = answers_from_jsonl(path)
    assert sum(len(getattr(task, s)) for s in ("train", "validation", "test")) == len(QUESTIONS)


def test_finetune_on_an_answer_task_reports_exact_match_and_f1(model_dir, tmp_path, capsys):  # noqa: F811
    path = _jsonl(tmp_path, [{"prompt": p, "answers": [a]} for p, a in QUESTIONS])
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(model_dir), "--task", path, "--output-dir", str(out), "--steps", "2",
                 "--batch-size", "4", "--max-length", "16", "--max-new-tokens", "2", "--directions", "3",
                 "--threads", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"]["metric"] == "exact_match"
    for phase in ("zero_shot", "fine_tuned"):
        final = metrics["final"][phase]["test"]
        assert 0.0 <= final["exact_match"] <= final["f1"] <= 1.0 and final["n"] > 0
    assert "test exact_match" in capsys.readouterr().out


def test_answer_demonstrations_show_solved_training_prompts_before_every_prompt(tmp_path):
    from zo_fx.tasks.answers import with_answer_demonstrations

    task = answers_from_jsonl(_jsonl(tmp_path, [{"prompt": p, "answers": [a]} for p, a in QUESTIONS]))
    shown = with_answer_demonstrations(task, 2, seed=3)
    prefix = shown.test[0]["prompt"][: -len(task.test[0]["prompt"])]
    shots = prefix.split("\n\n")[:-1]
    solved = {e["prompt"] + " " + e["answers"][0] for e in task.train}
    assert len(shots) == 2 and set(shots) <= solved
    for split in ("train", "validation", "test"):
        assert [e["prompt"] for e in getattr(shown, split)] == [prefix + e["prompt"] for e in getattr(task, split)]
        assert [e["answers"] for e in getattr(shown, split)] == [e["answers"] for e in getattr(task, split)]
    assert with_answer_demonstrations(task, 0, seed=3) is task


def test_a_reward_task_refuses_demonstrations(model_dir, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit, match="--demonstrations needs solved examples"):
        main(["finetune", "--model", str(model_dir), "--task", "arithmetic", "--demonstrations", "2",
              "--output-dir", str(tmp_path), "--steps", "1"])
