#!/usr/bin/env bash
# Llama 1.2B (random init, float32), B=4, T=16: full-rank FZOO, low-rank FZOO (r=1, 4) and MeZO steps with the
# native kernel and with ZO_FX_NATIVE=0, at all cores and at 1 thread, plus the step profile before and after
# (results: benchmarks/results/step_native_llama1b*.json, step_profile_llama1b_*.json; table in
# benchmarks/results/step_native_llama1b.md)
cd "$(dirname "$0")/.."
lscpu | grep "Model name"
STEP="benchmarks/step.py --model llama-1b --batch-size 4 --seq-len 16 --directions 8 --repeats 2 --warmup 1"
T=$(nproc)
.venv/bin/python $STEP --threads "$T" --methods zo_fx_fzoo,zo_fx_fzoo_lowrank1,zo_fx_fzoo_lowrank4,zo_fx_mezo,floor \
  --json benchmarks/results/step_native_llama1b_t$T.json
ZO_FX_NATIVE=0 .venv/bin/python $STEP --threads "$T" --methods zo_fx_fzoo,zo_fx_mezo,floor \
  --json benchmarks/results/step_torchpath_llama1b_t$T.json
.venv/bin/python $STEP --threads 1 --methods zo_fx_fzoo,zo_fx_mezo,floor --json benchmarks/results/step_native_llama1b_t1.json
PROFILE="benchmarks/step_profile.py --model llama-1b --batch-size 4 --seq-len 16 --threads 1"
.venv/bin/python $PROFILE --json benchmarks/results/step_profile_llama1b_native.json
ZO_FX_NATIVE=0 .venv/bin/python $PROFILE --json benchmarks/results/step_profile_llama1b_torchpath.json
