#!/usr/bin/env bash
# the method comparison of issue 22, scoped to the session's time: two tasks, one seed, budget 144 forward passes
set -x
cd /work/main
M="fzoo fzoo:lowrank2 fzoo:lowrank2:lazy5 mezo mezo:lowrank2 hizoo zoadam es adam"
COMMON="--threads 2 --seeds 0 --budget 144 --batch-size 8 --max-length 48 --probes 8 --probe-size 32 --n-test 200 --lrs es=1e-4"
lscpu | grep "Model name"
.venv/bin/python benchmarks/convergence.py $COMMON --methods $M \
  --json benchmarks/results/convergence_compare_vader.json --plot benchmarks/results/convergence_compare_vader.png
.venv/bin/python benchmarks/convergence.py $COMMON --methods $M --task runs/tasks/sums.jsonl \
  --label-words yes=Yes,no=No --template '{text}. Is this sum correct? Answer:' \
  --json benchmarks/results/convergence_compare_sums.json --plot benchmarks/results/convergence_compare_sums.png
