"""Trajectories are checked where they enter: a damaged or tampered file, or a model it does not fit, is refused.

A trajectory is what a run *is* (seeds, coefficients, learning rates): replaying a
changed one, or replaying it onto another model, gives other weights with no sign of
it. So the file carries the parameters' shapes, dtypes and tied names and a checksum
of its content, and ``Trajectory.load`` / ``zo_fx.replay`` refuse what does not match.
"""

import copy
import json

import pytest
import torch
from model_zoo import causal_batch, tiny_llama

import zo_fx
from zo_fx.optim.trajectory import content_checksum


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained 3 FZOO steps, its base copy and the saved trajectory dict."""
    model = tiny_llama(torch.float32)
    base = copy.deepcopy(model)
    opt = zo_fx.build_optimizer("fzoo", zo_fx.zo_compile(model, causal_batch()), lr=1e-3, n_directions=3)
    for i in range(3):
        opt.step(causal_batch(seed=i))
    return model, base, opt.trajectory.to_dict()


def _write(tmp_path, d, name="t.json"):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def test_a_saved_trajectory_replays_bit_for_bit(trained, tmp_path):
    model, base, d = trained
    replayed = zo_fx.replay(copy.deepcopy(base), zo_fx.Trajectory.load(_write(tmp_path, d)))
    for (n, a), b in zip(model.named_parameters(), replayed.parameters()):
        assert torch.equal(a, b), n


def _scaled_coef(d):
    d["records"][1]["coefs"][0] *= 1000


def _other_pid(d):
    d["params"][0][1] += 1


def _other_kind(d):
    d["kind"] = "gaussian"


def _removed_record(d):
    del d["records"][1]


def _no_params(d):
    d["params"] = []


def _nan_lr(d):
    d["records"][0]["lr"] = float("nan")


def _negative_seed(d):
    d["records"][0]["seeds"][0] = -1


def _unpaired_coef(d):
    d["records"][0]["coefs"].append(0.5)


def _unknown_mode(d):
    d["records"][0]["mode"] = "sgd"


def _params_not_a_list(d):
    d["params"] = "abc"


def _float_seed(d):
    d["records"][0]["seeds"][0] = 1.5


TAMPERING = [_scaled_coef, _other_pid, _other_kind, _removed_record, _no_params, _nan_lr]
#: values the optimizer never writes: refused by the field checks even under a recomputed checksum
OUT_OF_RANGE = [_no_params, _nan_lr, _negative_seed, _unpaired_coef, _unknown_mode, _params_not_a_list, _float_seed]


@pytest.mark.parametrize("tamper", TAMPERING, ids=lambda f: f.__name__.strip("_"))
def test_a_tampered_field_is_refused_by_the_checksum(trained, tmp_path, tamper):
    d = copy.deepcopy(trained[2])
    tamper(d)
    with pytest.raises(zo_fx.TrajectoryError, match="checksum"):
        zo_fx.Trajectory.load(_write(tmp_path, d))


@pytest.mark.parametrize("tamper", OUT_OF_RANGE, ids=lambda f: f.__name__.strip("_"))
def test_a_field_out_of_range_is_refused_even_with_a_recomputed_checksum(trained, tmp_path, tamper):
    """Someone who rewrites the checksum still cannot load a record the optimizer could not have written."""
    d = copy.deepcopy(trained[2])
    tamper(d)
    d["checksum"] = content_checksum(d)
    with pytest.raises(zo_fx.TrajectoryError):
        zo_fx.Trajectory.load(_write(tmp_path, d))


def test_a_truncated_file_is_a_clear_error(trained, tmp_path):
    text = json.dumps(trained[2])
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(zo_fx.TrajectoryError, match="truncated or not JSON"):
        zo_fx.Trajectory.load(path)


def _other_model(change):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tiny_llama(torch.float32).config.to_dict()
    base.update(change)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**base)).float().eval()


@pytest.mark.parametrize("change, says", [
    ({"hidden_size": 48}, "shape"),
    ({"num_hidden_layers": 3}, "had 21 parameter tensors"),  # every trained name is there: the count tells
    ({"tie_word_embeddings": False}, "tied"),
], ids=["hidden-48", "3-layers", "untied"])
def test_replay_refuses_a_model_that_differs(trained, change, says):
    trajectory = zo_fx.Trajectory.from_dict(trained[2])
    other = _other_model(change)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(zo_fx.TrajectoryError, match=says):
        zo_fx.replay(other, trajectory)
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters()), "a refused replay changed weights"


def test_replay_refuses_another_dtype(trained):
    trajectory = zo_fx.Trajectory.from_dict(trained[2])
    with pytest.raises(zo_fx.TrajectoryError, match="dtype float64, the run had float32"):
        zo_fx.replay(tiny_llama(torch.float64), trajectory)
