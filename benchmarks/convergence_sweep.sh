#!/usr/bin/env bash
# Issue 22's comparison on equal terms: every method and direction kind on VADER, two seeds (curves averaged),
# each method at the best of a three-point lr sweep (the lowest final probe loss represents it), 144 forward
# passes, plus the jsonl sums task with two seeds at the VADER winners' lrs.
# Results: benchmarks/results/convergence_sweep_{vader,sums}.{json,png} (table: convergence_sweep.md)
set -x
cd "$(dirname "$0")/.."
lscpu | grep "Model name"
M="fzoo fzoo:lowrank2 fzoo:lowrank2:lazy5 mezo mezo:lowrank2 hizoo zoadam zosgd_momentum es adam"
COMMON="--threads 2 --seeds 0 1 --budget 144 --batch-size 8 --max-length 48 --probes 8 --probe-size 32 --n-test 200"
SWEEP="fzoo=1e-2:linear,3e-2:linear,1e-1:linear mezo=3e-4,1e-3,3e-3 hizoo=3e-4,1e-3,3e-3 zoadam=3e-4,1e-3,3e-3
zosgd_momentum=3e-5,1e-4,3e-4 es=3e-5,1e-4,3e-4"
.venv/bin/python benchmarks/convergence.py $COMMON --methods $M --lrs $SWEEP \
  --json benchmarks/results/convergence_sweep_vader.json --plot benchmarks/results/convergence_sweep_vader.png
.venv/bin/python benchmarks/sums_task.py runs/tasks/sums.jsonl
.venv/bin/python benchmarks/convergence.py $COMMON --methods $M --lrs ${SUMS_LRS:-} --task runs/tasks/sums.jsonl \
  --label-words yes=Yes,no=No --template '{text}. Is this sum correct? Answer:' \
  --json benchmarks/results/convergence_sweep_sums.json --plot benchmarks/results/convergence_sweep_sums.png
