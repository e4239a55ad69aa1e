#!/usr/bin/env bash
# The accuracy run of the `small` preset on the synthetic benchmark (issue: >= 90% overall
# accuracy and COVID-19 sensitivity with <= 30 minutes of training on 2 CPU cores).
# Usage: scripts/accuracy.sh [OUT] (default runs/accuracy); needs `make install` first.
set -euo pipefail
OUT=${1:-runs/accuracy}
CT=${CTMASK:-.venv/bin/ctmask}
mkdir -p "$OUT"
stamp() { date +%s; }

"$CT" synth "$OUT/data" --slices 2500 --seed 0 -q > "$OUT/synth.txt"

t0=$(stamp)
# 1. segmentation model: 1,500 training slices, 6 epochs
"$CT" train-seg "$OUT/data/segmentation/train" --preset small --out "$OUT/seg.pt" \
  --epochs 6 --batch-size 4 --lr 5e-4 --weight-decay 1e-4 --json "$OUT/train-seg.json"
t1=$(stamp)
# 2. classifier, variant heads: the detector is frozen, so its ranked RoIs are computed once
"$CT" train-cls "$OUT/seg.pt" --preset small --variant heads \
  --train-split "$OUT/data/train_COVIDx_CT.txt" --val-split "$OUT/data/val_COVIDx_CT.txt" \
  --out "$OUT/cls-heads.pt" --epochs 100 --batch-size 8 --lr 1e-4 --json "$OUT/train-cls-heads.json"
t2=$(stamp)
# 3. classifier, variant heads+bn, fine-tuned from the heads classifier for one epoch
"$CT" train-cls "$OUT/cls-heads.pt" --preset small --variant heads+bn \
  --train-split "$OUT/data/train_COVIDx_CT.txt" --val-split "$OUT/data/val_COVIDx_CT.txt" \
  --out "$OUT/cls.pt" --epochs 1 --batch-size 8 --lr 1e-4 --json "$OUT/train-cls.json"
t3=$(stamp)

"$CT" evaluate "$OUT/cls.pt" --split "$OUT/data/test_COVIDx_CT.txt" --json "$OUT/eval-cls.json" -q
"$CT" evaluate "$OUT/seg.pt" --seg-dir "$OUT/data/segmentation/test" --json "$OUT/eval-seg.json" -q
echo "training wall time: segmentation $((t1 - t0)) s, heads $((t2 - t1)) s, heads+bn $((t3 - t2)) s," \
  "total $((t3 - t0)) s" | tee "$OUT/training-time.txt"
