"""``zo-fx finetune`` end to end, on a tiny random Llama and a tiny review file (no SmolLM2, no network).

The model folder is what a user would have: ``save_pretrained`` of a model and of its tokenizer
(a word-level vocabulary in which every word of the data, including the label words, is one
token). The data is ``tests/data/cli/reviews.jsonl``: 120 short "reviews" built from a positive
and a negative word list. Each run is a few steps: these tests check the job's contract (what it
writes, that resume is exact, what a mistake says), not that the model learns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zo_fx.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "cli"
REVIEWS = DATA / "reviews.jsonl"
WORDS = "pos=great,neg=terrible"
TEMPLATE = "Review: {text} It was"
METRICS_KEYS = {"settings", "task", "model", "history", "evals", "final"}
STEP_KEYS = {"step", "loss", "sigma", "lr", "forward_passes", "seconds", "skipped"}



def finetune(model_dir: Path, out: Path, *extra: str) -> dict:
    """Run ``zo-fx finetune`` in-process on the tiny model and review file; return metrics.json."""
    args = ["finetune", "--model", str(model_dir), "--task", str(REVIEWS), "--label-words", WORDS,
            "--template", TEMPLATE, "--batch-size", "4", "--max-length", "16", "--output-dir", str(out),
            "--threads", "1", *extra]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def error_of(capsys_or_none, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    message = raised.value.code
    assert isinstance(message, str), "a user error exits with a message, not a traceback or a bare status"
    assert message.startswith(f"zo-fx {argv[0]}: error: ")
    return message


# ---------------------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("method", ["fzoo", "mezo", "adamezo", pytest.param("es", marks=pytest.mark.slow),
                                    pytest.param("zoadam", marks=pytest.mark.slow),
                                    pytest.param("hizoo", marks=pytest.mark.slow), "adam"])
def test_a_run_writes_metrics_trajectory_weights_and_curves(model_dir, tmp_path, method):
    metrics = finetune(model_dir, tmp_path, "--method", method, "--steps", "3", "--eval-every", "2",
                       "--directions", "3", "--horizon", "2")
    assert METRICS_KEYS <= metrics.keys()
    assert len(metrics["history"]) == 3 and all(STEP_KEYS <= h.keys() for h in metrics["history"])
    per_step = {"fzoo": 4, "mezo": 2, "adamezo": 2, "es": 6, "zoadam": 2, "hizoo": 3, "adam": 1}[method]
    assert [h["forward_passes"] for h in metrics["history"]] == [per_step, 2 * per_step, 3 * per_step]
    final = metrics["final"]
    assert final["steps"] == 3 and final["forward_passes"] == 3 * per_step
    for phase in ("zero_shot", "fine_tuned"):
        for split in ("validation", "test"):
            assert 0.0 <= final[phase][split]["accuracy"] <= 1.0 and final[phase][split]["n"] > 0
    assert [(e["phase"], e["split"], e["step"]) for e in metrics["evals"]] == [
        ("zero_shot", "validation", 0), ("zero_shot", "test", 0), ("train", "validation", 2),
        ("train", "validation", 3), ("final", "test", 3)]
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "LATEST").read_text().strip() == "step-00000003"
    if method != "adam":
        trajectory = json.loads((tmp_path / "trajectory.json").read_text())
        assert trajectory["method"] == method and len(trajectory["records"]) == 3
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not leftovers, "every atomic write renamed its temporary file into place"


def test_the_saved_trajectory_replays_to_the_saved_weights(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import zo_fx

    finetune(model_dir, tmp_path, "--steps", "3", "--directions", "3")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    zo_fx.replay(base, zo_fx.Trajectory.load(tmp_path / "trajectory.json"))
    saved = load_file(str(tmp_path / "model.safetensors"))
    params = dict(base.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in saved.items())


@pytest.mark.parametrize("peft", ["lora", "prefix", "prompt"])
def test_peft_adapters_train_only_their_parameters(model_dir, tmp_path, peft):
    metrics = finetune(model_dir, tmp_path, "--peft", peft, "--steps", "2", "--directions", "3")
    names = load_file(str(tmp_path / "model.safetensors")).keys()
    assert metrics["model"]["trainable"] < metrics["model"]["parameters"] / 2
    marker = {"lora": "lora_", "prefix": "prompt_encoder", "prompt": "prompt_encoder"}[peft]
    assert names and all(marker in n for n in names)


def test_forward_budget_stops_before_overspending(model_dir, tmp_path):
    metrics = finetune(model_dir, tmp_path, "--forward-budget", "10", "--directions", "3")  # 4 per step
    assert metrics["final"]["steps"] == 2 and metrics["final"]["forward_passes"] == 8


# ---------------------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("method", ["fzoo", "adamezo", "adam", pytest.param("fzoo-lowrank", marks=pytest.mark.slow),
                                    "fzoo-lazy", pytest.param("zosgd_momentum", marks=pytest.mark.slow), "hizoo"])
def test_resume_continues_exactly_as_an_uninterrupted_run(model_dir, tmp_path, method):
    kind = {"-lowrank": ("--direction-kind", "lowrank", "--rank", "2"),
            "-lazy": ("--direction-kind", "lowrank", "--rank", "2", "--lazy-steps", "2")}
    kind = next((flags for suffix, flags in kind.items() if method.endswith(suffix)), ())
    method = method.split("-")[0]
    flags = ("--method", method, "--directions", "3", "--horizon", "2", "--eval-every", "2", *kind)
    straight = finetune(model_dir, tmp_path / "straight", "--steps", "6", *flags)
    finetune(model_dir, tmp_path / "split", "--steps", "3", *flags)
    resumed = finetune(model_dir, tmp_path / "split", "--steps", "6", "--resume", *flags)

    a = (tmp_path / "straight" / "model.safetensors").read_bytes()
    b = (tmp_path / "split" / "model.safetensors").read_bytes()
    assert a == b, "resumed weights differ from the uninterrupted run's"

    def without_time(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert without_time(resumed["history"]) == without_time(straight["history"])
    assert resumed["final"]["fine_tuned"] == straight["final"]["fine_tuned"]
    if method != "adam":
        assert (tmp_path / "straight" / "trajectory.json").read_text() == (
            tmp_path / "split" / "trajectory.json").read_text()
        kind = json.loads((tmp_path / "split" / "trajectory.json").read_text())["kind"]
        assert kind == ("lowrank:2:lazy" if "--lazy-steps" in flags else "lowrank:2" if "--rank" in flags
                        else "gaussian" if method in ("hizoo",) else kind)


@pytest.mark.parametrize("method", ["fzoo", "adam"])
def test_a_linear_schedule_decays_the_lr_to_zero_over_the_run(model_dir, tmp_path, method):
    metrics = finetune(model_dir, tmp_path, "--method", method, "--steps", "4", "--lr", "0.01",
                       "--lr-schedule", "linear", "--directions", "3")
    assert [h["lr"] for h in metrics["history"]] == pytest.approx([0.01, 0.0075, 0.005, 0.0025])


def test_a_linear_run_interrupted_midway_resumes_exactly(model_dir, tmp_path, monkeypatch):
    import zo_fx

    flags = ("--steps", "4", "--lr-schedule", "linear", "--directions", "3", "--checkpoint-every", "1")
    straight = finetune(model_dir, tmp_path / "straight", *flags)
    real_step, calls = zo_fx.FZOO.step, []

    def interrupted_step(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C during the third step
        return real_step(self, batch)

    monkeypatch.setattr(zo_fx.FZOO, "step", interrupted_step)
    with pytest.raises(SystemExit) as interrupted:
        finetune(model_dir, tmp_path / "split", *flags)
    assert "--resume" in str(interrupted.value.code)
    monkeypatch.undo()
    refused = error_of(None, _argv(model_dir, tmp_path / "split", **{"--max-length": "16"})
                       + ["--resume", *flags[:-2], "--steps", "6"])
    assert "--steps" in refused, "a linear decay spans the planned steps; another --steps must be refused"
    resumed = finetune(model_dir, tmp_path / "split", *flags, "--resume")
    assert (tmp_path / "split" / "model.safetensors").read_bytes() == (
        tmp_path / "straight" / "model.safetensors").read_bytes()
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in straight["history"]]


def test_resume_with_other_settings_is_refused_and_loses_nothing(model_dir, tmp_path):
    finetune(model_dir, tmp_path, "--steps", "2", "--directions", "3")
    before = (tmp_path / "model.safetensors").read_bytes()
    message = error_of(None, ["finetune", "--model", str(model_dir), "--task", str(REVIEWS),
                              "--label-words", WORDS, "--template", TEMPLATE, "--batch-size", "4",
                              "--max-length", "16", "--directions", "3", "--output-dir", str(tmp_path),
                              "--resume", "--steps", "4", "--lr", "0.5"])
    assert "--lr" in message and "other settings" in message
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_an_earlier_run_is_replaced_only_by_overwrite_and_only_once_the_new_run_is_valid(model_dir, tmp_path):
    finetune(model_dir, tmp_path, "--steps", "3", "--directions", "3")
    before = (tmp_path / "metrics.json").read_text()
    message = error_of(None, _argv(model_dir, tmp_path))
    assert "--resume" in message and "--overwrite" in message
    two_token_word = {"--label-words": "pos=very good,neg=terrible"}
    error_of(None, _argv(model_dir, tmp_path, **two_token_word) + ["--overwrite"])
    assert (tmp_path / "metrics.json").read_text() == before, (
        "a rejected --overwrite run must not cost the old one")
    metrics = finetune(model_dir, tmp_path, "--steps", "1", "--directions", "3", "--overwrite")
    assert metrics["final"]["steps"] == 1 and (tmp_path / "LATEST").read_text().strip() == "step-00000001"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000001"], (
        "the old checkpoints are gone")


def test_a_skipped_step_is_reported_and_training_goes_on(model_dir, tmp_path, capsys):
    metrics = finetune(model_dir, tmp_path, "--steps", "4", "--directions", "3", "--lr", "1e38")
    skipped = [h for h in metrics["history"] if h["skipped"]]
    assert len(metrics["history"]) == 4 and skipped, "an lr of 1e38 saturates every logit after one step"
    assert all("step skipped, weights untouched" in h["reason"] for h in skipped)  # NaN losses or sigma = 0
    assert metrics["final"]["skipped_steps"] == len(skipped)
    captured = capsys.readouterr()
    assert skipped[0]["reason"] in captured.out + captured.err, "each skipped step is reported as it happens"


# ---------------------------------------------------------------------------------------------------------
# mistakes: a clear message that says what to do, no traceback, nothing written


def _argv(model_dir, out, **overrides) -> list[str]:
    opts = {"--model": str(model_dir), "--task": str(REVIEWS), "--label-words": WORDS, "--template": TEMPLATE,
            "--output-dir": str(out), "--batch-size": "4", **overrides}
    argv = ["finetune"]
    for key, value in opts.items():
        if value is not None:
            argv += [key, value]
    return argv


def _weightless(tmp_path) -> Path:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


BAD_INPUTS = [
    # (name, overrides, phrases the message must contain)
    ("unknown task", {"--task": "no-such-task", "--label-words": None, "--template": None},
     ["unknown task", "vader"]),
    ("missing jsonl file", {"--task": "missing.jsonl"}, ["no such file"]),
    ("jsonl without label words", {"--label-words": None}, ["--label-words", "--template"]),
    ("unknown model", {"--model": "no-such-model"}, ["not in the local Hugging Face cache", "smollm2"]),
    ("model folder without weights", {"--model": "WEIGHTLESS"}, ["no weights", "save_pretrained"]),
    ("random shape without tokenizer", {"--model": "tiny-llama"}, ["no tokenizer"]),
    ("label word of two tokens", {"--label-words": "pos=very good,neg=terrible"},
     ["single token", "--label-words"]),
    ("label words half mapped", {"--label-words": "pos=great,terrible"}, ["label=word"]),
    ("label not covered", {"--label-words": "pos=great,meh=terrible"}, ["has no label word"]),
    ("template without text", {"--template": "It was"}, ["{text}"]),
    ("empty split", {"--n-test": "0"}, ["split 'test'", "no examples"]),
    ("batch larger than the data", {"--batch-size": "1000"}, ["--batch-size"]),
    ("resume with nothing to resume", {"--resume": ""}, ["no intact checkpoint", "without --resume"]),
    ("bad learning rate", {"--lr": "-1"}, ["--lr"]),
    ("max length too short", {"--max-length": "1"}, ["--max-length", "at least"]),
    ("invalid config.json", {"--model": "BROKEN_CONFIG"}, ["could not be loaded", "config.json"]),
    ("truncated weights", {"--model": "TRUNCATED_WEIGHTS"}, ["could not be loaded", "weight files are complete"]),
    ("text that is null", {"--task": "NULL_TEXT"}, ["line 2", "non-empty string"]),
]


def _broken_model(model_dir: Path, tmp_path: Path, how: str) -> Path:
    folder = tmp_path / how.lower()
    shutil.copytree(model_dir, folder)
    if how == "BROKEN_CONFIG":
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    else:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _null_text_task(tmp_path: Path) -> Path:
    path = tmp_path / "null.jsonl"
    lines = REVIEWS.read_text().splitlines()
    path.write_text("\n".join([lines[0], json.dumps({"text": None, "label": "pos"}), *lines[1:]]) + "\n")
    return path


@pytest.mark.parametrize("overrides, phrases", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(model_dir, tmp_path, overrides, phrases):
    overrides = dict(overrides)
    if overrides.get("--model") == "WEIGHTLESS":
        overrides["--model"] = str(_weightless(tmp_path))
    if overrides.get("--model") in ("BROKEN_CONFIG", "TRUNCATED_WEIGHTS"):
        overrides["--model"] = str(_broken_model(model_dir, tmp_path, overrides["--model"]))
    if overrides.get("--task") == "NULL_TEXT":
        overrides["--task"] = str(_null_text_task(tmp_path))
    out = tmp_path / "run"
    argv = _argv(model_dir, out, **{k: v for k, v in overrides.items() if k != "--resume"})
    if "--resume" in overrides:
        argv.append("--resume")
    message = error_of(None, argv)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} missing from: {message}"
    assert "\n" not in message.strip(), "one paragraph"
    assert not out.exists() or not any(out.iterdir()), "a rejected run writes nothing"


# ---------------------------------------------------------------------------------------------------------
# entry points and the benchmark


def test_python_m_zo_fx_finetune_help():
    done = subprocess.run([sys.executable, "-m", "zo_fx", "finetune", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for flag in ("--model", "--task", "--method", "--peft", "--forward-budget", "--resume", "--label-words"):
        assert flag in done.stdout


@pytest.mark.slow  # a benchmark end to end, 8-10 s (./run.sh test -m slow)
def test_convergence_benchmark_smoke_run_writes_json_and_plot(model_dir, tmp_path):
    out_json, out_png = tmp_path / "convergence.json", tmp_path / "convergence.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--model", str(model_dir),
         "--task", str(REVIEWS), "--label-words", WORDS, "--template", TEMPLATE, "--budget", "40",
         "--batch-size", "4", "--adam-steps", "4", "--max-length", "16", "--threads", "1",
         "--lrs", "fzoo=1e-3,2e-3:linear", "--methods", "fzoo", "fzoo:lowrank2", "mezo", "mezo:lowrank1:lazy2",
         "adamezo", "es", "zosgd_momentum", "zoadam", "hizoo", "adam", "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert {r["method"] for r in result["runs"]} == {"fzoo", "fzoo:lowrank2", "mezo", "mezo:lowrank1:lazy2", "adamezo",
                                                      "es", "zosgd_momentum", "zoadam", "hizoo", "adam"}
    state = {r["method"]: r["optimizer_state_mib"] for r in result["runs"]}
    assert state["mezo"] == 0 and state["hizoo"] > 0 and state["zoadam"] == pytest.approx(2 * state["hizoo"])
    constant, linear = (r for r in result["runs"] if r["method"] == "fzoo")
    assert constant["schedule"] == "constant" and set(constant["curve"]["lr"]) == {1e-3}
    assert linear["schedule"] == "linear"
    steps = linear["steps"]
    assert linear["curve"]["lr"] == pytest.approx([2e-3 * (1 - k / steps) for k in range(steps)])
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "| method" in done.stdout


# ---------------------------------------------------------------------------------------------------------
# one run per folder


HOLD_LOCK = ("import sys, time; from zo_fx.locks import RunLock; RunLock.acquire(sys.argv[1]); "
             "print('held', flush=True); time.sleep(120)")


def test_a_second_run_on_a_folder_in_use_is_refused_overwrite_included(model_dir, tmp_path):
    """A real second process holds the folder: the run is refused before it reads or writes anything there."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "metrics.json").write_text("{}")  # the holder's file: --overwrite must not touch it
        for extra in ([], ["--overwrite"]):
            argv = ["finetune", "--model", str(model_dir), "--task", str(REVIEWS), "--label-words", WORDS,
                    "--template", TEMPLATE, "--output-dir", str(out), "--steps", "1", *extra]
            message = error_of(None, argv)
            assert f"PID {holder.pid}" in message and "another run" in message
        assert (out / "metrics.json").read_text() == "{}"
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    from zo_fx.locks import LOCK_NAME, RunLock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # as a crash would: the lock file stays
    holder.wait()
    assert (out / LOCK_NAME).exists()
    with RunLock.acquire(out):
        assert "stale lock" in capsys.readouterr().out
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------------
# damaged checkpoints, interrupted first checkpoints, changed data


def _flip_bytes(path: Path, count: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_a_coefficient(path: Path) -> None:
    state = json.loads(path.read_text())
    state["trajectory"]["records"][-1]["coefs"][0] *= 1000
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("damage", [
    lambda step: _flip_bytes(step / "weights.safetensors"),
    lambda step: _edit_a_coefficient(step / "optimizer.json"),
], ids=["weights-bytes-flipped", "coefficient-edited"])
def test_a_damaged_newest_checkpoint_is_passed_over_for_the_newest_intact_one(model_dir, tmp_path, capsys, damage):
    """Resuming from step 2 after damage to step 3 gives exactly the run resumed from an intact step 2."""
    flags = ("--directions", "3", "--checkpoint-every", "1")
    finetune(model_dir, tmp_path / "straight", "--steps", "4", *flags)
    finetune(model_dir, tmp_path / "run", "--steps", "3", *flags)
    steps = sorted((tmp_path / "run").glob("step-*"))
    assert [p.name for p in steps] == ["step-00000002", "step-00000003"]
    damage(steps[-1])
    resumed = finetune(model_dir, tmp_path / "run", "--steps", "4", "--resume", *flags)
    out = capsys.readouterr().out
    assert "step-00000003 skipped" in out and "resuming from step-00000002" in out
    assert resumed["history"][-1]["step"] == 4
    a = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == a


def test_leftovers_of_a_kill_during_the_first_checkpoint_block_nothing(model_dir, tmp_path):
    out = tmp_path / "run"
    leftover = out / "step-00000001.tmp"
    leftover.mkdir(parents=True)
    (leftover / "weights.safetensors").write_bytes(bytes(10))  # killed mid-write
    message = error_of(None, [*_argv(model_dir, out), "--resume", "--steps", "2"])
    assert "no intact checkpoint" in message and "without --resume" in message
    finetune(model_dir, out, "--steps", "2", "--directions", "3")  # a fresh start needs no --overwrite
    assert not leftover.exists()


def test_resume_on_changed_task_data_is_refused(model_dir, tmp_path):
    task = tmp_path / "reviews.jsonl"
    shutil.copy(REVIEWS, task)
    argv = ["finetune", "--model", str(model_dir), "--task", str(task), "--label-words", WORDS, "--template",
            TEMPLATE, "--batch-size", "4", "--max-length", "16", "--output-dir", str(tmp_path / "run"),
            "--threads", "1", "--directions", "3"]
    assert main([*argv, "--steps", "2"]) == 0
    flipped = [json.loads(line) for line in task.read_text().splitlines()]
    for row in flipped:
        row["label"] = "neg" if row["label"] == "pos" else "pos"
    task.write_text("\n".join(json.dumps(r) for r in flipped) + "\n")
    message = error_of(None, [*argv, "--steps", "4", "--resume"])
    assert "task data changed" in message


# ---------------------------------------------------------------------------------------------------------
# outputs Hugging Face loads


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_the_trained_model_loads_with_from_pretrained_and_gives_the_runs_logits(model_dir, tmp_path, peft):
    """``out/model`` (full fine-tune) or ``out/adapter`` (PEFT) equals the base model with the run's weights."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zo_fx.finetune.model import apply_peft

    finetune(model_dir, tmp_path, "--steps", "2", "--directions", "3", "--peft", peft, "--lr", "0.05")
    trained = load_file(str(tmp_path / "model.safetensors"))
    expected = apply_peft(AutoModelForCausalLM.from_pretrained(model_dir), peft, seed=0)
    missing, unexpected = expected.load_state_dict(trained, strict=False)
    assert not unexpected
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if peft == "none":
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
        assert AutoTokenizer.from_pretrained(tmp_path / "model")("It was great")["input_ids"]
    else:
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    got, want = _logits(loaded, ids), _logits(expected.eval(), ids)
    assert torch.equal(got, want)
    assert not torch.equal(got, _logits(AutoModelForCausalLM.from_pretrained(model_dir).eval(), ids)), \
        "the run did not change the model"


def test_a_task_folder_brings_its_own_splits(model_dir, tmp_path):
    lines = REVIEWS.read_text().splitlines()
    folder = tmp_path / "reviews"
    folder.mkdir()
    cut = {"train.jsonl": lines[:-8], "validation.jsonl": lines[-8:-4], "test.jsonl": lines[-4:]}
    for name, part in cut.items():
        (folder / name).write_text("\n".join(part) + "\n")
    argv = ["finetune", "--model", str(model_dir), "--task", str(folder), "--label-words", WORDS, "--template",
            TEMPLATE, "--batch-size", "4", "--max-length", "16", "--threads", "1", "--directions", "3"]
    (folder / "test.jsonl").rename(folder / "held-out.jsonl")
    assert "lacks ['test.jsonl']" in error_of(None, [*argv, "--output-dir", str(tmp_path / "a"), "--steps", "1"])
    (folder / "held-out.jsonl").rename(folder / "test.jsonl")
    assert main([*argv, "--output-dir", str(tmp_path / "b"), "--steps", "1"]) == 0
    sizes = json.loads((tmp_path / "b" / "metrics.json").read_text())["task"]["sizes"]
    assert sizes == {"train": len(lines) - 8, "validation": 4, "test": 4}


def test_compilation_is_its_own_phase_before_the_step_bar(model_dir, tmp_path, capsys):
    finetune(model_dir, tmp_path, "--steps", "1", "--directions", "3")
    err = capsys.readouterr().err
    assert "compile" in err and err.index("compile") < err.index("fzoo")


def test_replay_rebuilds_the_run_and_eval_scores_it_as_the_run_did(model_dir, tmp_path, capsys):
    """``zo-fx replay`` gives the run's weights bit for bit; ``zo-fx eval`` of its model/ gives the run's test score."""
    metrics = finetune(model_dir, tmp_path / "run", "--steps", "2", "--directions", "3", "--lr", "0.05")
    capsys.readouterr()
    assert main(["replay", str(tmp_path / "run"), "--output-dir", str(tmp_path / "replayed")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical_to_the_run"] is True and result["records"] == 2
    assert main(["eval", "--model", str(tmp_path / "replayed" / "model"), "--task", str(REVIEWS), "--label-words",
                 WORDS, "--template", TEMPLATE, "--max-length", "16"]) == 0
    scores = {r["split"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert scores["test"]["accuracy"] == metrics["final"]["fine_tuned"]["test"]["accuracy"]
    assert scores["test"]["loss"] == pytest.approx(metrics["final"]["fine_tuned"]["test"]["loss"], rel=1e-6)
    message = error_of(None, ["replay", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "x")])
    assert "not a finished zo-fx run" in message


def test_an_output_dir_that_cannot_be_created_fails_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    import zo_fx.finetune.job as job

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output dir was checked")

    monkeypatch.setattr(job, "load_model_and_tokenizer", no_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = error_of(None, _argv(model_dir, blocker / "run"))
    assert "cannot create the run folder" in message


def test_label_words_outside_the_vocabulary_fail_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    import zo_fx.finetune.job as job

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the label words were checked")

    monkeypatch.setattr(job, "load_model_and_tokenizer", no_load)
    message = error_of(None, _argv(model_dir, tmp_path / "run", **{"--label-words": "pos=fantastic,neg=horrible"}))
    assert "' fantastic'" in message and "unknown token" in message


def test_finetune_under_torchrun_splits_the_directions_and_rank_0_writes(model_dir, tmp_path):
    """``torchrun --nproc_per_node=2 -m zo_fx finetune ...`` unchanged: one set of outputs, the
    weights of the single-process run (directions are split over the ranks, the losses gathered)."""
    args = ["finetune", "--model", str(model_dir), "--task", str(REVIEWS), "--label-words", WORDS,
            "--template", TEMPLATE, "--batch-size", "4", "--max-length", "16", "--threads", "1",
            "--steps", "2", "--directions", "3"]
    single = tmp_path / "single"
    finetune(model_dir, single, "--steps", "2", "--directions", "3")
    out = tmp_path / "dist"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "zo_fx", *args, "--output-dir", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    assert outputs[1][0] == "" and "validation accuracy" not in outputs[1][1]  # rank 1 silent
    assert "finetune" in outputs[0][0] or (out / "metrics.json").exists()
    a, b = load_file(single / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
