"""Nothing silent in a run: NaN outputs score nothing, failed writes say so and lose nothing, limits are checked
before the work, and a preempted run saves itself.

Each test runs ``zo-fx`` as a user would (in-process, or as a subprocess where a signal or a resource limit
is part of the fault) on the tiny Llama and review file of ``test_cli.py``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import REVIEWS, ROOT, TEMPLATE, WORDS, _argv, error_of, finetune  # noqa: F401

from zo_fx.cli import main
from zo_fx.tasks.jsonl import read_jsonl

FLAGS = ("--directions", "3", "--checkpoint-every", "1")


def _cli(out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "zo_fx", "finetune", "--model", str(model), "--task", str(REVIEWS),
            "--label-words", WORDS, "--template", TEMPLATE, "--batch-size", "4", "--max-length", "16",
            "--threads", "1", "--output-dir", str(out), *extra]


def _env() -> dict:
    return {**os.environ, "ZO_FX_COMPILE": "0", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def straight(model_dir, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted 4-step run: what every interrupted one must end at, bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    finetune(model_dir, out, "--steps", "4", *FLAGS)
    return out


def _same_weights(run: Path, reference: Path) -> bool:
    return (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# finite weights, metrics never from NaN outputs


def test_an_lr_above_the_dtype_range_is_refused_before_anything_loads(model_dir, tmp_path):  # noqa: F811
    message = error_of(None, _argv(model_dir, tmp_path / "run", **{"--dtype": "float16", "--lr": "1e6"}))
    assert "--lr" in message and "float16" in message and "65504" in message


def test_a_run_whose_steps_keep_failing_stops_with_finite_weights(model_dir, tmp_path):  # noqa: F811
    """float16 at an lr near its range: the first update saturates the model, every later step fails."""
    out = tmp_path / "run"
    message = error_of(None, _argv(model_dir, out, **{"--dtype": "float16", "--lr": "6e4", "--steps": "30",
                                                       "--checkpoint-every": "1", "--directions": "3"}))
    assert "in a row" in message and "smaller --lr" in message and "is intact" in message
    for step in out.glob("step-*"):
        weights = load_file(str(step / "weights.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), f"{step.name} holds non-finite weights"


def _nan_model(model_dir: Path, tmp_path: Path) -> Path:  # noqa: F811
    folder = tmp_path / "nan-model"
    shutil.copytree(model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    name = next(n for n in weights if n.endswith("norm.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    from safetensors.torch import save_file

    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_eval_of_a_nan_model_reports_no_accuracy_and_fails(model_dir, tmp_path, capsys):  # noqa: F811
    folder = _nan_model(model_dir, tmp_path)
    status = main(["eval", "--model", str(folder), "--task", str(REVIEWS), "--label-words", WORDS,
                   "--template", TEMPLATE, "--max-length", "16"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    assert status == 1, "eval of a model with NaN outputs must not exit 0"
    for r in results:
        assert r["accuracy"] is None and r["loss"] is None and r["non_finite"] == r["n"] > 0
    assert "not available" in captured.err and "NaN or inf" in captured.err


# ---------------------------------------------------------------------------------------------------------
# write failures: clear, nothing half-written, resume exact


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_checkpoint_write_failing_under_a_file_size_limit_is_clear_and_resume_is_exact(
        model_dir, tmp_path, straight):  # noqa: F811
    out = tmp_path / "run"
    finetune(model_dir, out, "--steps", "2", *FLAGS)
    weights_bytes = (out / "step-00000002" / "weights.safetensors").stat().st_size
    done = subprocess.run(_cli(out, model_dir, "--steps", "4", "--resume", *FLAGS), env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size(weights_bytes // 2))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    for phrase in ("could not write checkpoint step-00000003", "file size limit", "needs about",
                   "step-00000002, is kept", "--resume"):
        assert phrase in message, f"{phrase!r} missing from: {message}"
    assert not list(out.glob("*.tmp")) and not list(out.glob("step-*.tmp")), "temporary files are cleaned up"
    assert (out / "LATEST").read_text().strip() == "step-00000002"
    finetune(model_dir, out, "--steps", "4", "--resume", *FLAGS)
    assert _same_weights(out, straight), "the resumed run must end at the uninterrupted run's weights"


# ---------------------------------------------------------------------------------------------------------
# limits checked before the work


def _gpt2_folder(model_dir: Path, tmp_path: Path, positions: int) -> Path:  # noqa: F811
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _no_model_load(monkeypatch):
    import zo_fx.finetune.job as job

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(job, "load_model_and_tokenizer", no_load)


def test_a_prompt_longer_than_the_learned_positions_is_refused_before_the_model_loads(
        model_dir, tmp_path, monkeypatch):  # noqa: F811
    folder = _gpt2_folder(model_dir, tmp_path, positions=12)
    _no_model_load(monkeypatch)
    message = error_of(None, _argv(folder, tmp_path / "run", **{"--max-length": "16"}))
    assert "--max-length 16" in message and "12 positions" in message and "--max-length 12 or less" in message


def test_a_prompt_within_the_learned_positions_runs(model_dir, tmp_path):  # noqa: F811
    folder = _gpt2_folder(model_dir, tmp_path, positions=16)
    metrics = finetune(folder, tmp_path / "run", "--steps", "1", "--directions", "2")
    assert metrics["final"]["fine_tuned"]["test"]["accuracy"] is not None


def test_a_model_folder_without_a_tokenizer_fails_before_the_weights_load(model_dir, tmp_path, monkeypatch):  # noqa: F811
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, folder / name)
    _no_model_load(monkeypatch)
    message = error_of(None, _argv(folder, tmp_path / "run"))
    assert "no tokenizer" in message and "tokenizer.save_pretrained" in message


def test_resume_with_fewer_steps_than_done_says_so(model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    finetune(model_dir, out, "--steps", "3", "--directions", "3")
    message = error_of(None, [*_argv(model_dir, out), "--resume", "--steps", "2", "--directions", "3",
                              "--max-length", "16", "--threads", "1"])
    assert "already done 3 steps" in message and "--steps 3 or more" in message


def test_a_jsonl_with_a_byte_order_mark_is_valid_input(tmp_path):
    plain = REVIEWS.read_text(encoding="utf-8")
    marked = tmp_path / "reviews-bom.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.encode("utf-8"))
    assert read_jsonl(marked) == read_jsonl(REVIEWS)


# ---------------------------------------------------------------------------------------------------------
# preemption


# The job run by a driver that sends itself SIGTERM as step 2 begins: the signal lands inside a step on any
# machine (polling for a checkpoint folder from outside raced a 4-step run that ends in a tenth of a second), and
# with checkpoints due only every 4 steps, the checkpoint after step 2 can only come from the stop itself.
_SIGTERM_IN_STEP_2 = """
import os, runpy, signal, sys
from zo_fx.finetune.job import FinetuneJob
real_step = FinetuneJob.step
calls = []
def step_signalled_at_2(self, batch):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(self, batch)
FinetuneJob.step = step_signalled_at_2
sys.argv = ["zo_fx", *sys.argv[1:]]
runpy.run_module("zo_fx", run_name="__main__")
"""


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(model_dir, tmp_path, straight):  # noqa: F811
    out = tmp_path / "run"
    flags = ("--directions", "3", "--checkpoint-every", "4")
    argv = _cli(out, model_dir, "--steps", "4", *flags)
    assert argv[1:3] == ["-m", "zo_fx"]
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_IN_STEP_2, *argv[3:]], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err and "--resume" in err
    latest = (out / "LATEST").read_text().strip()
    assert latest == "step-00000002", "the step under way when the signal came ends, and in a checkpoint"
    assert f"checkpoint {latest} written" in err
    finetune(model_dir, out, "--steps", "4", "--resume", *flags)
    assert _same_weights(out, straight)
