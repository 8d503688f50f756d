#!/usr/bin/env bash
# Recipes of the checkable task models (python/llada/task_models/<task>/),
# see docs/task_models.md. sort and add were trained on one H200 (about a
# minute each); perm on 2 CPU cores (a few minutes).
#
#   scripts/train_task_models.sh [RUN_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${1:-/tmp/llada_runs}

for task in sort add; do
  nice -n 10 "$PYTHON" -m llada.train --task "$task" --d-model 128 --n-layers 4 --n-heads 4 \
    --batch-size 512 --steps 2500 --lr 2e-3 --warmup 200 --eval-every 250 --save-every 500 \
    --accuracy-examples 0 --out "$RUNS/$task"
done
OMP_NUM_THREADS=1 nice -n 10 "$PYTHON" -m llada.train --task perm --d-model 96 --n-layers 3 --n-heads 4 \
  --batch-size 256 --steps 1500 --lr 3e-3 --warmup 100 --train-examples 100000 \
  --eval-every 250 --accuracy-examples 100 --save-every 250 --device cpu --out "$RUNS/perm"

for task in sort add perm; do
  "$PYTHON" scripts/export_model.py "$RUNS/$task" "python/llada/task_models/$task"
done
