#!/usr/bin/env bash
# Every method and direction kind on two tasks (VADER, a jsonl of sums to check), one seed, 144 forward passes
# each (results: benchmarks/results/convergence_compare_*.{json,png,md})
set -x
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/sums_task.py runs/tasks/sums.jsonl   # the second task, a jsonl file
M="fzoo fzoo:lowrank2 fzoo:lowrank2:lazy5 mezo mezo:lowrank2 hizoo zoadam es adam"
COMMON="--threads 2 --seeds 0 --budget 144 --batch-size 8 --max-length 48 --probes 8 --probe-size 32 --n-test 200 --lrs es=1e-4"
lscpu | grep "Model name"
.venv/bin/python benchmarks/convergence.py $COMMON --methods $M \
  --json benchmarks/results/convergence_compare_vader.json --plot benchmarks/results/convergence_compare_vader.png
.venv/bin/python benchmarks/convergence.py $COMMON --methods $M --task runs/tasks/sums.jsonl \
  --label-words yes=Yes,no=No --template '{text}. Is this sum correct? Answer:' \
  --json benchmarks/results/convergence_compare_sums.json --plot benchmarks/results/convergence_compare_sums.png
