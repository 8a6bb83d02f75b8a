#!/usr/bin/env bash
# FZOO, low-rank FZOO and MeZO steps with the native kernel and with ZO_FX_NATIVE=0, at 1 and 2 threads
# (results: benchmarks/results/step_native_smollm2.md)
cd "$(dirname "$0")/.."
lscpu | grep "Model name"
for t in 1 2; do
  echo "=== threads $t, native"
  .venv/bin/python benchmarks/step.py --model smollm2 --threads $t --methods zo_fx_fzoo,zo_fx_fzoo_lowrank1,zo_fx_mezo,floor --json benchmarks/results/step_native_smollm2_t$t.json 2>&1 | grep -v "GGUF\|Loading\|DEBUG"
  echo "=== threads $t, ZO_FX_NATIVE=0"
  ZO_FX_NATIVE=0 .venv/bin/python benchmarks/step.py --model smollm2 --threads $t --methods zo_fx_fzoo,zo_fx_mezo,floor --json benchmarks/results/step_torchpath_smollm2_t$t.json 2>&1 | grep -v "GGUF\|Loading\|DEBUG"
done
