#!/usr/bin/env bash
# A short training recipe for one preset on a small synthetic benchmark (docs/benchmarks.md,
# "Lightweight model"): train-seg, then the preset's classifier head (variant heads, the frozen
# detector's RoIs computed once and cached), then evaluate on the test split. Run it for
# resnet18-t1 and for small on the same data to compare them.
# Usage: scripts/train_lightweight.sh OUT PRESET [SEG_EPOCHS] [HEADS_EPOCHS] [SEG_IMAGES]
# DATA (environment): a `ctmask synth` folder to reuse (default: OUT/data, 400 slices, seed 0).
set -euo pipefail
OUT=${1:?usage: scripts/train_lightweight.sh OUT PRESET [SEG_EPOCHS] [HEADS_EPOCHS] [SEG_IMAGES]}
PRESET=${2:?usage: scripts/train_lightweight.sh OUT PRESET [SEG_EPOCHS] [HEADS_EPOCHS] [SEG_IMAGES]}
SEG_EPOCHS=${3:-1}
HEADS_EPOCHS=${4:-40}
SEG_IMAGES=${5:-240}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
CT=${CTMASK:-.venv/bin/ctmask}
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-$OUT/data}
mkdir -p "$OUT"
[ -f "$DATA/synth.json" ] || "$CT" synth "$DATA" --slices 400 --seed 0 -q
HEAD=$("$PY" -c "import sys; from ctmask.core.presets import get_preset; print(get_preset(sys.argv[1]).head)" "$PRESET")
LR=$([ "$HEAD" = pooled ] && echo 3e-4 || echo 1e-4)
t0=$(date +%s)
"$CT" train-seg "$DATA/segmentation/train" --preset "$PRESET" --out "$OUT/$PRESET-seg.pt" --epochs "$SEG_EPOCHS" \
  --batch-size 4 --lr 5e-4 --weight-decay 1e-4 --max-images "$SEG_IMAGES" --json "$OUT/$PRESET-train-seg.json" -q
t1=$(date +%s)
"$CT" train-cls "$OUT/$PRESET-seg.pt" --preset "$PRESET" --variant heads --head "$HEAD" \
  --train-split "$DATA/train_COVIDx_CT.txt" --val-split "$DATA/val_COVIDx_CT.txt" --out "$OUT/$PRESET-cls.pt" \
  --epochs "$HEADS_EPOCHS" --batch-size 8 --lr "$LR" --roi-cache "$OUT/roi-cache" --json "$OUT/$PRESET-train-cls.json" -q
t2=$(date +%s)
"$CT" evaluate "$OUT/$PRESET-cls.pt" --split "$DATA/test_COVIDx_CT.txt" --json "$OUT/$PRESET-eval-cls.json" -q
echo "$PRESET: train-seg $((t1 - t0)) s, train-cls $((t2 - t1)) s, total $((t2 - t0)) s" | tee "$OUT/$PRESET-time.txt"
