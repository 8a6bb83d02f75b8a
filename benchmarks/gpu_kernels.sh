#!/usr/bin/env bash
# GPU check of zo_fx/kernels: the kernel tests compiled (no interpreter) on CUDA tensors,
# then a bf16 microbenchmark of grouped_linear against torch's plain linear.
#
#   OUT=./runs bash benchmarks/gpu_kernels.sh          # BENCH_ARGS=--quick for two shapes only
#
# Writes into $OUT (default ./runs): gpu_env.txt, gpu_tests_<part>.txt and .xml (pytest
# output and JUnit XML), gpu_bench_linear.json and its log. Exits with the tests' status.
#
# Time: every kernel variant the tests use is compiled once (20-30 of them, 5-25 s each
# for sm_90 on one core), so the tests run as three pytest processes side by side.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./runs}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET  # compiled kernels on CUDA tensors
export ZO_FX_AUTOTUNE=0  # tests: one tile config per variant (tuning is the benchmark's business)

{
  nvidia-smi || true
  "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/gpu_env.txt" 2>&1

run_part() {  # run_part NAME PYTEST_ARGS...
  local name=$1; shift
  timeout 420 "$PY" -m pytest -q "$@" --junitxml="$OUT/gpu_tests_$name.xml" > "$OUT/gpu_tests_$name.txt" 2>&1
}
run_part philox tests/test_kernels_philox.py &
run_part linear_main tests/test_kernels_ops.py -k "grouped_linear_matches_reference" &
run_part others tests/test_kernels_ops.py -k "not grouped_linear_matches_reference" &
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
tail -n 3 "$OUT"/gpu_tests_*.txt

unset ZO_FX_AUTOTUNE
timeout 300 "$PY" benchmarks/gpu_bench_linear.py --out "$OUT/gpu_bench_linear.json" ${BENCH_ARGS:-} \
  > "$OUT/gpu_bench_linear.log" 2>&1 || echo "benchmark failed: see $OUT/gpu_bench_linear.log"
tail -n 5 "$OUT/gpu_bench_linear.log"

exit "$status"
