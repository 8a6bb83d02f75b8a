#!/usr/bin/env bash
# FZOO steps with full-rank and low-rank (r = 1, 4) directions beside both floors, side by side in one process per
# model and thread count: SmolLM2-135M (B=16, T=24) at 1 thread and at all cores, Llama 1.2B random (B=4, T=16) at
# all cores. Results: benchmarks/results/step_lowrank_{smollm2,llama1b}_t*.json (table: step_lowrank_smollm2.md)
set -e
cd "$(dirname "$0")/.."
lscpu | grep "Model name"
T=$(nproc)
M="zo_fx_fzoo,zo_fx_fzoo_lowrank1,zo_fx_fzoo_lowrank4,floor"
for t in 1 "$T"; do
  .venv/bin/python benchmarks/step.py --model smollm2 --batch-size 16 --seq-len 24 --directions 8 --repeats 3 \
    --threads "$t" --methods "$M" --json "benchmarks/results/step_lowrank_smollm2_t$t.json"
done
.venv/bin/python benchmarks/step.py --model llama-1b --batch-size 4 --seq-len 16 --directions 8 --repeats 2 \
  --warmup 1 --threads "$T" --methods "$M" --json "benchmarks/results/step_lowrank_llama1b_t$T.json"
