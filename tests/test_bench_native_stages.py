"""benchmarks/native_stages.py builds its C harness with the library's own flags and reports every stage."""

import importlib.util
import json
from pathlib import Path

import pytest

from zo_fx.kernels import native

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(not native.available(), reason="the native library does not build here")
def test_every_stage_and_kernel_reports_a_positive_rate(tmp_path):
    spec = importlib.util.spec_from_file_location("_bench_native_stages", BENCH / "native_stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "stages.json"
    result = module.main(["--seconds", "0.002", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    stages = {r["stage"] for r in result["rows"]}
    for name in ("philox", "gaussian values", "rademacher sign words", "rademacher tiles f32", "rademacher update f32",
                 "memcpy"):
        assert any(s.startswith(name) for s in stages), (name, stages)
    assert len(result["rows"]) == 5 + 3 * 5
    assert all(r["rate"] > 0 for r in result["rows"])
    assert result["cpu"] and result["flags"] == native.info()["flags"]
