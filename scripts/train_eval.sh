#!/usr/bin/env bash
# The end-to-end recipe of the `small` preset on the synthetic benchmark: synth ->
# train-seg -> train-cls heads -> train-cls heads+bn (fine-tuned from heads) -> evaluate.
# `make accuracy` runs it at full size (issue: >= 90% accuracy and COVID-19 sensitivity
# with <= 30 minutes of training on 2 CPU cores); `make demo` runs it smaller.
# Usage: scripts/train_eval.sh OUT [SLICES] [SEG_EPOCHS] [HEADS_EPOCHS]; needs `make install`.
set -euo pipefail
OUT=${1:?usage: scripts/train_eval.sh OUT [SLICES] [SEG_EPOCHS] [HEADS_EPOCHS]}
SLICES=${2:-2500}
SEG_EPOCHS=${3:-6}
HEADS_EPOCHS=${4:-100}
CT=${CTMASK:-.venv/bin/ctmask}
PY=${PYTHON:-.venv/bin/python}
DATA="$OUT/data"
SPLITS=(--train-split "$DATA/train_COVIDx_CT.txt" --val-split "$DATA/val_COVIDx_CT.txt")
mkdir -p "$OUT"
stamp() { date +%s; }

"$CT" synth "$DATA" --slices "$SLICES" --seed 0 -q > "$OUT/synth.txt"

t0=$(stamp)
# 1. segmentation model
"$CT" train-seg "$DATA/segmentation/train" --preset small --out "$OUT/seg.pt" \
  --epochs "$SEG_EPOCHS" --batch-size 4 --lr 5e-4 --weight-decay 1e-4 --json "$OUT/train-seg.json"
t1=$(stamp)
# 2. classifier, variant heads: the detector is frozen, so its ranked RoIs are computed once
"$CT" train-cls "$OUT/seg.pt" --preset small --variant heads "${SPLITS[@]}" \
  --out "$OUT/cls-heads.pt" --epochs "$HEADS_EPOCHS" --batch-size 8 --lr 1e-4 --json "$OUT/train-cls-heads.json"
t2=$(stamp)
# 3. classifier, variant heads+bn, fine-tuned from the heads classifier for one epoch
"$CT" train-cls "$OUT/cls-heads.pt" --preset small --variant heads+bn "${SPLITS[@]}" \
  --out "$OUT/cls.pt" --epochs 1 --batch-size 8 --lr 1e-4 --json "$OUT/train-cls.json"
t3=$(stamp)

"$CT" evaluate "$OUT/cls.pt" --split "$DATA/test_COVIDx_CT.txt" --json "$OUT/eval-cls.json" -q
"$CT" evaluate "$OUT/seg.pt" --seg-dir "$DATA/segmentation/test" --json "$OUT/eval-seg.json" -q
echo "training wall time: segmentation $((t1 - t0)) s, heads $((t2 - t1)) s, heads+bn $((t3 - t2)) s," \
  "total $((t3 - t0)) s" | tee "$OUT/training-time.txt"
"$PY" -c "import json, sys; c = json.load(open(sys.argv[1]))['splits']; \
print('small preset trained on', c['train']['n'], 'SYNTHETIC training slices (' + \
', '.join(f'{k} {v}' for k, v in c['train']['classes'].items()) + '), evaluated on', \
c['test']['n'], 'test slices; reports in', sys.argv[2])" "$DATA/synth.json" "$OUT/"
