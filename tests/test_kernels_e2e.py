"""End to end through the Triton kernels (under the interpreter on CPU): same losses, same weights."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from close import assert_close  # noqa: E402
from model_zoo import causal_batch, tiny_gpt2, tiny_llama  # noqa: E402

import zo_fx  # noqa: E402
from zo_fx import kernels  # noqa: E402
from zo_fx.streams import GroupTable  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")


@pytest.fixture(autouse=True)
def _interpreted_kernels():
    """The kernels must have been loaded in interpreter mode (other tests may have imported them first)."""
    from zo_fx.kernels import _support

    if _support.kernels_interpreted() is False:
        pytest.skip("Triton kernels were compiled before TRITON_INTERPRET=1 was set in this process")


def _used_kernel(monkeypatch):
    calls = []
    real = kernels.__getattr__

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(kernels, "__getattr__", spy)
    return calls


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_triton_impl_gives_the_torch_group_losses(make_model, monkeypatch):
    model, batch = make_model(torch.float32), causal_batch(2, 5)
    table = GroupTable([0, 21, 21], [0.0, 1.0, -1.0], 1e-2, "rademacher")
    torch_losses = zo_fx.zo_compile(model, batch, impl="torch").group_losses(batch, table)
    calls = _used_kernel(monkeypatch)
    triton_losses = zo_fx.zo_compile(model, batch, impl="triton").group_losses(batch, table)
    assert "grouped_linear" in calls
    assert_close(triton_losses, torch_losses, rtol=1e-5, atol=1e-5, what="group losses, Triton vs torch")


def test_fzoo_steps_through_the_kernels_match_the_torch_path():
    """Same losses up to float32 rounding, and weights that differ only as much as the coefficients do.

    The update is the same code on both paths; the forward may differ by float32 rounding,
    which FZOO's normalisation by sigma (N = 2 directions here) amplifies in the
    coefficients. Each step moves a weight by at most ``lr * sum_i |coef_i| * max|u|``, so
    two runs whose coefficients differ by ``delta_i`` may differ by ``lr * sum_i |delta_i|``
    per step (Rademacher: |u| = 1), plus rounding.
    """
    model, batch = tiny_llama(torch.float32), causal_batch(2, 5)
    results, infos = {}, {}
    for impl in ("torch", "triton"):
        m = copy.deepcopy(model)
        opt = zo_fx.FZOO(zo_fx.zo_compile(m, batch, impl=impl), lr=1e-2, eps=1e-2, n_directions=2)
        infos[impl] = [opt.step(batch) for _ in range(2)]
        results[impl] = m
    bound = 0.0
    for a, b in zip(infos["torch"], infos["triton"]):
        assert a.seeds == b.seeds
        assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=1e-5, atol=1e-5, what="step losses")
        bound += a.lr * sum(abs(x - y) for x, y in zip(a.coefs, b.coefs))
    print(f"weights may differ by {bound:.3e} from the coefficients' differences")
    for (n, a), b in zip(results["torch"].named_parameters(), results["triton"].parameters()):
        assert_close(b, a, rtol=1e-6, atol=bound + 1e-7, what=f"{n} after 2 FZOO steps, Triton vs torch")
