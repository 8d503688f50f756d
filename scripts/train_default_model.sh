#!/usr/bin/env bash
# Recipe of the bundled default model (python/llada/default_model/): a 5.9M
# parameter LLaDA code model pretrained on the Python standard library of the
# interpreter that runs this script (see docs/default_model.md).
#
#   scripts/train_default_model.sh [RUN_DIR]
#
# The shipped model was made by exactly this command on one H200 (117 s of
# training, ~1.1M tokens/s, bf16 autocast). It runs on CPU too, but at ~1k
# tokens/s on two busy cores the 131M tokens would take days: there, lower
# --steps (the cosine schedule follows it) or the model size.
#
# RUN_DIR (default /tmp/llada_runs/default_model) receives the full run, resume
# state included (`python -m llada.train --resume RUN_DIR` continues it); the
# user-facing files are then exported into the package with bf16 weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${1:-/tmp/llada_runs/default_model}

nice -n 10 "$PYTHON" -m llada.train \
  --corpus stdlib --vocab-size 4096 --held-out-fraction 0.03 \
  --seq-len 256 --d-model 256 --n-layers 6 --n-heads 4 --weight-tying --batch-size 128 --steps 4000 \
  --lr 3e-3 --warmup 200 --min-lr-ratio 0.1 --weight-decay 0.1 --grad-clip 1.0 --seed 0 \
  --eval-every 250 --eval-batches 8 --save-every 500 --out "$RUN"

"$PYTHON" scripts/export_model.py "$RUN" python/llada/default_model --dtype bfloat16
# Prompts are bare text (no BOS): training windows start anywhere in a file.
"$PYTHON" - <<'PY'
import json
p = "python/llada/default_model/tokenizer.json"
t = json.load(open(p))
assert t["post_processor"] is None, "expected a BPE tokenizer without a BOS post-processor"
PY
