"""``zo-fx finetune`` on reward tasks: generation in the step, mean reward in the evaluations, exact resume."""

from __future__ import annotations

import json

import pytest

from zo_fx.cli import main

FLAGS = ("--batch-size", "4", "--max-length", "24", "--threads", "1", "--directions", "3", "--max-new-tokens", "3",
         "--n-train", "16", "--n-val", "4", "--n-test", "4", "--checkpoint-every", "1")


def reward_run(model_dir, out, *extra) -> dict:  # noqa: F811
    assert main(["finetune", "--model", str(model_dir), "--output-dir", str(out), *FLAGS, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


SAMPLED = ("--task", "countdown", "--lr", "1e-2", "--do-sample", "--temperature", "1.5")


@pytest.fixture(scope="module")
def straight(model_dir, tmp_path_factory):  # noqa: F811
    """A 2-step sampled Countdown run, uninterrupted."""
    out = tmp_path_factory.mktemp("reward") / "straight"
    return out, reward_run(model_dir, out, *SAMPLED, "--steps", "2")


def test_a_reward_task_trains_on_generated_completions_and_reports_mean_reward(straight):
    out, metrics = straight
    assert metrics["task"]["metric"] == "reward" and metrics["task"]["rewards"] == ["countdown_reward"]
    assert all("reward" in h and len(h["rewards"]) == 4 for h in metrics["history"])
    assert {"generate_s", "score_s"} <= set(metrics["history"][0]["timing"])
    final = metrics["final"]["fine_tuned"]["test"]
    assert final["n"] == 4 and final["reward"] is not None and 0.0 <= final["reward"] <= 1.0
    assert metrics["settings"]["do_sample"] and metrics["settings"]["temperature"] == 1.5
    assert (out / "trajectory.json").is_file() and (out / "model").is_dir()


def test_a_reward_run_resumes_bit_identically(model_dir, tmp_path, straight):  # noqa: F811
    reward_run(model_dir, tmp_path / "run", *SAMPLED, "--steps", "1")
    reward_run(model_dir, tmp_path / "run", *SAMPLED, "--steps", "2", "--resume")
    a = (straight[0] / "model.safetensors").read_bytes()
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == a


def test_a_jsonl_of_prompts_with_user_and_built_in_rewards(model_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    rows = [{"prompt": f"Review : {word} {i} It was", "answers": ["great"]}
            for i, word in enumerate(["good", "fine", "nice", "bad", "awful", "dull", "fun", "long"] * 5)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(completions, **kwargs):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    metrics = reward_run(model_dir, tmp_path / "run", "--task", str(path), "--reward",
                         "exact_match,my_rewards:brevity:0.1", "--steps", "1", "--n-val", "2", "--n-test", "2")
    assert metrics["task"]["rewards"] == ["exact_match", "brevity"] and metrics["task"]["weights"] == [1.0, 0.1]
    assert "test reward" in capsys.readouterr().out, "the summary shows the mean reward"


@pytest.mark.parametrize("flags, phrase", [
    (("--task", "countdown", "--method", "adam"), "needs a differentiable loss"),
    (("--task", "arithmetic", "--reward", "no_such_reward"), "unknown reward"),
    (("--task", "missing.jsonl", "--reward", "exact_match"), "no such file"),
])
def test_reward_mistakes_get_a_clear_error(model_dir, tmp_path, flags, phrase):  # noqa: F811
    with pytest.raises(SystemExit) as raised:
        main(["finetune", "--model", str(model_dir), "--output-dir", str(tmp_path / "run"), *FLAGS, *flags])
    assert phrase in str(raised.value.code)
