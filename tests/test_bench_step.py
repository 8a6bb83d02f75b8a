"""benchmarks/step.py and benchmarks/reference.py: the step benchmark runs end to end, its memory
measure sees what a step allocates, and the reference algorithms compute what their papers say.

The reference steps are checked in float64 against explicit, out-of-place evaluations of the same
formulas, so the baselines zo_fx is compared with are themselves correct.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from zo_fx.models import random_model, synthetic_batch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step = _load("step")
ref = _load("reference")

# One thread: other test runs may share the CPU, and OpenMP threads waiting at barriers for a
# descheduled sibling can make tiny steps 100x slower.
SMOKE = (
    "--model tiny-llama --batch-size 2 --seq-len 8 --directions 2 --repeats 1 --warmup 0 --threads 1".split()
)
SMOKE += ["--adamezo-horizon", "2"]
METHOD_KEYS = set("step_s step_s_min step_s_max peak_mem_bytes forward_passes_per_step compile_s".split())
METHOD_KEYS |= {"s_per_forward", "step_cpu_s", "ratios"}
SETTINGS_KEYS = set("model batch_size seq_len directions dtype device repeats warmup methods threads".split())
SETTINGS_KEYS |= {"torch", "transformers", "zo_fx", "peak_mem_measure", "floor_reference"}
# forward passes per step at N=2
FORWARDS = dict(zo_fx_fzoo=3, reference_fzoo=3, floor=3, floor_per_copy=3)
FORWARDS |= dict(zo_fx_mezo=2, zo_fx_adamezo=2, reference_mezo=2, adam=1)
FORWARDS |= dict(zo_fx_fzoo_lowrank1=3, zo_fx_fzoo_lowrank4=3, zo_fx_hizoo=3, zo_fx_zoadam=2, zo_fx_zosgd_momentum=2,
                 zo_fx_es=2)  # ES: N // 2 = 1 antithetic pair


def _smoke(tmp_path, methods):
    out = tmp_path / "step.json"
    argv = [*SMOKE, "--json", str(out)] + (["--methods", methods] if methods else [])
    threads_before = torch.get_num_threads()
    returned = step.main(argv)
    result = json.loads(out.read_text())
    assert set(result) == {"settings", "methods"}
    assert SETTINGS_KEYS <= set(result["settings"])
    assert result["settings"]["threads"] == 1 and torch.get_num_threads() == threads_before
    for name, r in result["methods"].items():
        assert METHOD_KEYS <= set(r), name
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        assert r["peak_mem_bytes"] > 0
        assert r["forward_passes_per_step"] == FORWARDS[name]
    assert (tmp_path / "step.png").stat().st_size > 1000
    assert returned["methods"].keys() == result["methods"].keys()
    return result


@pytest.mark.slow  # a benchmark end to end, 8-10 s (./run.sh test -m slow)
def test_smoke_every_method(tmp_path):
    """Needs zo_fx.zo_compile / FZOO / MeZO / AdaMeZO: fails (loudly) until they exist."""
    result = _smoke(tmp_path, None)
    assert set(result["methods"]) == set(FORWARDS)
    for name in step.ZO_FX_METHODS:
        assert result["methods"][name]["compile_s"] > 0


def test_smoke_baselines(tmp_path, capsys):
    result = _smoke(tmp_path, "reference_fzoo,reference_mezo,adam,floor")
    methods = result["methods"]
    assert list(methods) == ["reference_fzoo", "reference_mezo", "adam", "floor", "floor_per_copy"]
    floor = result["settings"]["floor_reference"]
    assert floor == min(("floor", "floor_per_copy"), key=lambda m: methods[m]["step_s"])
    assert methods[floor]["ratios"]["step_vs_floor"] == 1.0
    assert methods["reference_fzoo"]["ratios"]["step_vs_reference_fzoo"] == 1.0
    assert methods["reference_mezo"]["ratios"]["s_per_forward_vs_reference_mezo"] == 1.0
    assert all(m["compile_s"] is None for m in methods.values())
    # Adam keeps two moments next to the weights: clearly more memory than any forward-only method.
    assert methods["adam"]["peak_mem_bytes"] > 2 * methods["reference_fzoo"]["peak_mem_bytes"] * 0.9
    table = capsys.readouterr().out
    assert f"floor = {floor}" in table and "| reference_mezo |" in table


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_peft_adapters_side_by_side_and_a_failing_one_reported_in_its_row(tmp_path, capsys, monkeypatch):
    # An adapter whose target matches no module, so get_peft_model fails for certain (whether the real
    # dora / ia3 / loha compile depends on zo_fx's rules, not on the benchmark).
    broken = lambda peft: peft.LoraConfig(target_modules=["no_such_proj"])  # noqa: E731
    monkeypatch.setitem(step.PEFT_ADAPTERS, "broken", broken)
    out = tmp_path / "peft.json"
    returned = step.main([*SMOKE, "--peft", "broken", "lora", "--methods", "zo_fx_fzoo", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result) == {"settings", "adapters"} and returned["adapters"].keys() == {"broken", "lora"}
    assert result["settings"]["peft"] == ["broken", "lora"] and result["settings"]["threads"] == 1
    failed, lora = result["adapters"]["broken"], result["adapters"]["lora"]
    assert "not found in the base model" in failed["error"] and not failed["methods"]
    assert lora["error"] is None and lora["errors"] == {}
    assert list(lora["methods"]) == ["zo_fx_fzoo", "floor", "floor_per_copy"]  # the floors always run
    assert sorted(lora["config"]["target_modules"]) == ["q_proj", "v_proj"] and lora["config"]["r"] == 8
    # tiny-llama, rank 8, 2 layers: q_proj 64 -> 64 (8*64 + 64*8) + v_proj 64 -> 32 (8*64 + 32*8)
    assert lora["trainable_params"] == 2 * (1024 + 768)
    fzoo = lora["methods"]["zo_fx_fzoo"]
    assert METHOD_KEYS <= set(fzoo) and fzoo["forward_passes_per_step"] == FORWARDS["zo_fx_fzoo"]
    assert fzoo["peak_mem_bytes"] > 0 and fzoo["compile_s"] > 0
    assert fzoo["ratios"]["floor"] == lora["floor_reference"] in ("floor", "floor_per_copy")
    assert lora["methods"][lora["floor_reference"]]["ratios"]["step_vs_floor"] == 1.0
    title, summary = fzoo["report"].splitlines()
    assert title.startswith("zo_fx report") and "trainable tensors (3,584 elements)" in summary
    table = capsys.readouterr().out
    assert "| broken | - |" in table and "error: NoMatchingPeftModuleError: Target modules" in table
    assert "| lora | zo_fx_fzoo | 3,584 |" in table and "unused trainable tensors: 0 |" in table
    assert (tmp_path / "peft.png").stat().st_size > 1000


def test_methods_flag_expands_floor_and_rejects_unknown_names():
    assert step._expand_methods("adam,floor,floor_per_copy") == ["adam", "floor", "floor_per_copy"]
    with pytest.raises(SystemExit, match="choose from"):
        step._expand_methods("adam,sgd")


def test_zo_fx_methods_fail_loudly_when_the_api_is_missing(monkeypatch):
    import zo_fx

    monkeypatch.delattr(zo_fx, "zo_compile", raising=False)
    with pytest.raises(RuntimeError, match="--methods reference_fzoo"):
        step.main([*SMOKE, "--methods", "zo_fx_fzoo"])


def test_cpu_peak_sees_allocations_and_reports_freed_preexisting_storage():
    keep = torch.zeros(1 << 18)  # 1 MiB alive before the step: part of the baseline

    def scratch():
        a = torch.ones(1 << 20)  # 4 MiB, freed before the step ends
        return float((a * 2).sum())  # + 4 MiB temporary

    r = step._cpu_peak(scratch, exclude=set())
    delta = r["peak_mem_bytes"] - r["peak_mem_baseline_bytes"]
    assert 8 << 20 <= delta < 9 << 20
    assert r["peak_mem_baseline_bytes"] >= keep.nbytes and r["peak_mem_preexisting_freed_bytes"] == 0

    holder = {"t": keep}
    del keep

    def replace():
        holder["t"] = holder["t"] + 1  # out of place: the old 1 MiB dies inside the step

    r = step._cpu_peak(replace, exclude=set())
    assert r["peak_mem_preexisting_freed_bytes"] >= 1 << 20


# ---- the reference algorithms, against explicit float64 evaluations --------------------------------


def _setup():
    torch.manual_seed(0)
    model = random_model("tiny-llama", dtype=torch.float64)
    batch = synthetic_batch(model.config.vocab_size, 2, 8)
    return model, batch


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _noise(theta, seed, kind):
    """The reference's direction: one generator seeded once, drawn parameter by parameter in order."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in theta.items():
        if kind == "rademacher":
            out[name] = torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype) * 2 - 1
        else:
            out[name] = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return out


def _loss_at(model, batch, theta):
    with torch.no_grad():
        return torch.func.functional_call(model, theta, args=(), kwargs=batch).loss.item()


def test_reference_fzoo_step_follows_the_algorithm():
    model, batch = _setup()
    theta, seeds, eps, lr, n = _params(model), [11, 22, 33], 1e-3, 0.5, 3
    info = ref.reference_fzoo_step(model, batch, eps, lr, n, seeds=seeds)
    us = [_noise(theta, s, "rademacher") for s in seeds]
    # The losses are those of explicitly perturbed weights (HF computes the loss in float32, hence 1e-6) ...
    assert info["loss"] == pytest.approx(_loss_at(model, batch, theta), rel=1e-6)
    explicit = [_loss_at(model, batch, {k: theta[k] + eps * u[k] for k in theta}) for u in us]
    assert info["losses"] == pytest.approx(explicit, rel=1e-6)
    # ... sigma and the coefficients are the FZOO formulas applied to them ...
    ls = torch.tensor(info["losses"], dtype=torch.float64)
    sigma = ls.std(unbiased=False).item()
    coefs = ((ls - info["loss"]) / (n * sigma)).tolist()
    assert info["sigma"] == pytest.approx(sigma, rel=1e-12) and not info["skipped"]
    assert info["coefs"] == pytest.approx(coefs, rel=1e-12)
    # ... and the update is theta - lr * sum_i coef_i u_i.
    for name, p in model.named_parameters():
        expected = theta[name] - lr * sum(c * u[name] for c, u in zip(coefs, us))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-10)


def test_reference_fzoo_skips_when_sigma_is_zero():
    model, batch = _setup()
    theta = _params(model)
    info = ref.reference_fzoo_step(model, batch, 0.0, 1.0, 2, seeds=[1, 2])  # eps=0: all losses equal
    assert info["skipped"] and info["sigma"] == 0
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())


def test_reference_mezo_step_follows_the_algorithm():
    model, batch = _setup()
    theta, eps, lr = _params(model), 1e-3, 0.1
    info = ref.reference_mezo_step(model, batch, eps, lr, seed=7)
    z = _noise(theta, 7, "gaussian")
    assert info["loss_plus"] == pytest.approx(
        _loss_at(model, batch, {k: theta[k] + eps * z[k] for k in theta}), rel=1e-6
    )
    assert info["loss_minus"] == pytest.approx(
        _loss_at(model, batch, {k: theta[k] - eps * z[k] for k in theta}), rel=1e-6
    )
    g = (info["loss_plus"] - info["loss_minus"]) / (2 * eps)
    assert info["projected_grad"] == pytest.approx(g, rel=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[name] - lr * g * z[name], rtol=0, atol=1e-10)


def test_floor_modes_compute_the_same_loss_and_leave_weights_alone():
    model, batch = _setup()
    theta = _params(model)
    one = ref.floor_forward(model, batch, 3, "one_batch")
    per = ref.floor_forward(model, batch, 3, "per_copy")
    # Equal up to float32 rounding of the loss (HF upcasts logits with .float(), i.e. float32).
    assert one == pytest.approx(per, rel=1e-6) and one == pytest.approx(
        _loss_at(model, batch, theta), rel=1e-6
    )
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="one_batch"):
        ref.floor_forward(model, batch, 3, "sideways")


def test_adam_step_updates_and_frees_gradients():
    model, batch = _setup()
    theta = _params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = ref.adam_step(model, batch, opt)
    assert loss == pytest.approx(_loss_at(model, batch, theta), rel=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(p, theta[n]) for n, p in model.named_parameters())


@pytest.mark.slow  # a benchmark end to end, 8-10 s (./run.sh test -m slow)
def test_sweep_runs_every_model_shape_and_method_side_by_side(tmp_path):
    out = tmp_path / "sweep.json"
    argv = ["--sweep", "--sweep-models", "tiny-llama", "--sweep-shapes", "2x8", "1x16", "--methods",
            "zo_fx_fzoo,floor", "--directions", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--json", str(out)]
    step.main(argv)
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["batch_size"], r["seq_len"], r["tokens"]) for r in runs] == [(2, 8, 16), (1, 16, 16)]
    for run in runs:
        assert set(run["methods"]) == {"zo_fx_fzoo", "floor", "floor_per_copy"}
        fzoo = run["methods"]["zo_fx_fzoo"]
        # the update reads and writes every trainable element once; the step moves at least that
        trainable_bytes = 4 * sum(p.numel() for p in random_model("tiny-llama").parameters())
        assert fzoo["update_gbs"] > 0 and fzoo["weight_bytes_moved"] >= 2 * trainable_bytes
        assert fzoo["ratios"]["step_vs_floor"] > 0 and run["memcpy_gbs"] > 0
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| tiny-llama | 2x8 | zo_fx_fzoo |" in (tmp_path / "sweep.md").read_text()


def test_step_profile_puts_a_steps_time_in_categories(tmp_path):
    profiler = _load("step_profile")
    assert profiler.category("aten::bmm") == "GEMM" and profiler.category("aten::silu") == "elementwise"
    assert profiler.category("## Call CompiledFxGraph abc") == "direction generation"
    out = profiler.main(["--model", "tiny-llama", "--batch-size", "2", "--seq-len", "8", "--directions", "2",
                         "--threads", "1", "--json", str(tmp_path / "p.json")])
    zo, floor = out["seconds"]["zo_fx fzoo"], out["seconds"]["floor (per copy)"]
    assert zo["GEMM"] > 0 and floor["GEMM"] > 0 and "direction generation" not in floor
    assert "| direction generation |" in (tmp_path / "p.md").read_text()
