#!/usr/bin/env bash
# Deployment half of the demo: export the trained classifier to ONNX, predict the
# held-out test slices with the torch-free runtime, check parity against PyTorch and
# benchmark both. Usage: scripts/deploy.sh OUT  (OUT holds cls.pt and data/ from
# scripts/train_eval.sh); needs `make install`.
set -euo pipefail
OUT=${1:?usage: scripts/deploy.sh OUT}
CT=${CTMASK:-.venv/bin/ctmask}
DATA="$OUT/data"
HELD="$OUT/held-out"

# The test split's slices, by link, in one folder (the model never saw them in training).
rm -rf "$HELD" && mkdir -p "$HELD"
while read -r name _; do
  ln -s "$(cd "$DATA/images" && pwd)/$name" "$HELD/$name"
done < "$DATA/test_COVIDx_CT.txt"

"$CT" export "$OUT/cls.pt" --out "$OUT/model.onnx" --json "$OUT/export.json"
"$CT" infer "$OUT/model.onnx" "$HELD" --batch-size 8 --out "$OUT/predictions.jsonl" -q --json "$OUT/infer.json"
"$CT" parity "$OUT/cls.pt" "$OUT/model.onnx" --images "$HELD" --max-images 64 --json "$OUT/parity.json" -q
"$CT" bench "$OUT/model.onnx" --checkpoint "$OUT/cls.pt" --batch-size 1 --batch-size 8 --iterations 10 \
  --json "$OUT/bench.json" -q
