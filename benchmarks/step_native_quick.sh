#!/usr/bin/env bash
# The step comparison of step_native.sh and step_native_1b.sh in one shorter run (2 timed steps after 1 warm-up):
# SmolLM2-135M (B=16, T=24) at 1 thread and at all cores, native and ZO_FX_NATIVE=0; Llama 1.2B (B=4, T=16) at all
# cores, native. Results: benchmarks/results/step_quick_*${TAG}.json (table in benchmarks/results/step_native_smollm2.md);
# TAG (say TAG=_xeon) keeps one machine's files beside another's.
cd "$(dirname "$0")/.."
lscpu | grep "Model name"
T=$(nproc)
S="benchmarks/step.py --model smollm2 --batch-size 16 --seq-len 24 --directions 8 --repeats 2 --warmup 1"
for t in 1 "$T"; do
  .venv/bin/python $S --threads "$t" --methods zo_fx_fzoo,zo_fx_fzoo_lowrank1,zo_fx_mezo,floor \
    --json "benchmarks/results/step_quick_smollm2_native_t$t${TAG}.json"
  ZO_FX_NATIVE=0 .venv/bin/python $S --threads "$t" --methods zo_fx_fzoo,zo_fx_mezo,floor \
    --json "benchmarks/results/step_quick_smollm2_torch_t$t${TAG}.json"
done
.venv/bin/python benchmarks/step.py --model llama-1b --batch-size 4 --seq-len 16 --directions 8 --repeats 2 --warmup 1 \
  --threads "$T" --methods zo_fx_fzoo,zo_fx_fzoo_lowrank1,zo_fx_mezo,floor --json "benchmarks/results/step_quick_llama1b_native_t$T${TAG}.json"
