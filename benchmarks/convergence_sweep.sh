#!/usr/bin/env bash
# Issue 22's comparison on equal terms: every method and both direction kinds, two seeds (curves averaged), FZOO
# and MeZO (full and low rank) at the best of a three-point lr sweep, ES of two, the MeZO-based estimators (HiZOO,
# ZO-Adam, ZO-SGD momentum) at their defaults (the lowest final probe loss represents a method), 144 forward passes.
# TASKS="vader sums" (default) picks the tasks: VADER, and the jsonl of sums written by benchmarks/sums_task.py.
# Results: benchmarks/results/convergence_sweep_<task>.{json,png}; tables in benchmarks/results/convergence_sweep.md
set -x
cd "$(dirname "$0")/.."
lscpu | grep "Model name"
M="fzoo fzoo:lowrank2 mezo hizoo zoadam zosgd_momentum es adam"
COMMON="--threads 2 --seeds 0 1 --budget 144 --batch-size 8 --max-length 48 --probes 8 --probe-size 32 --n-test 200"
SWEEP="fzoo=1e-2:linear,3e-2:linear,1e-1:linear mezo=3e-4,1e-3,3e-3 es=1e-4,3e-4"
for task in ${TASKS:-vader sums}; do
  if [ "$task" = sums ]; then
    .venv/bin/python benchmarks/sums_task.py runs/tasks/sums.jsonl
    TASK_ARGS=(--task runs/tasks/sums.jsonl --label-words yes=Yes,no=No --template '{text}. Is this sum correct? Answer:')
  else
    TASK_ARGS=(--task "$task")
  fi
  .venv/bin/python benchmarks/convergence.py $COMMON --methods $M --lrs $SWEEP "${TASK_ARGS[@]}" \
    --json "benchmarks/results/convergence_sweep_$task.json" --plot "benchmarks/results/convergence_sweep_$task.png"
done
