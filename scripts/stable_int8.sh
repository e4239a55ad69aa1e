#!/usr/bin/env bash
# INT8 with the head trained on its own INT8 graphs' RoIs (issue 18): the pooled head on
# matrix-suppressed RoIs of a (QAT) detector, in two passes.
#  1. a head on the exact RoIs, only to export the detector's INT8 graphs (both targets): their
#     ranked RoIs depend on the detector, its ranges and the target, never on the head;
#  2. per SEED, the head trained again on the exact RoIs plus both INT8 graphs' RoIs, with the
#     consistency term (`train-cls --rois-from ... --consistency`); then its FP32 graph, its own
#     INT8 graphs (every convolution int8; FP32: the head and, by default, the box head's two
#     Linear layers, whose scores the ranking reads), `ctmask parity` of each against PyTorch, and
#     the class agreement of each with the FP32 graph on every test slice.
# Usage: scripts/stable_int8.sh SEG RUN OUT  (SEG: a `ctmask qat` segmentation checkpoint, or any
# with QAT=0; RUN: a `make accuracy` folder, RUN/data).
# Environment: SEED (0), SUPPRESSION (matrix), CONSISTENCY (1), QAT (1: quantize from SEG's QAT
# scales via `ctmask qat-ranges`), METHOD (entropy), CAL_SIZE (128), PARITY (200), TARGETS ("tensorrt cpu"),
# FP32_BLOCKS (classifier,box_head,box_predictor: the seeds' INT8 graphs' `--fp32-blocks`), PASS1_FP32_BLOCKS
# (classifier: pass 1's, whose RoIs are the training copies; both as measured in docs/precision.md).
set -euo pipefail
SEG=${1:?usage: scripts/stable_int8.sh SEG RUN OUT}
RUN=${2:?usage: scripts/stable_int8.sh SEG RUN OUT}
OUT=${3:?usage: scripts/stable_int8.sh SEG RUN OUT}
SEED=${SEED:-0}
SUPPRESSION=${SUPPRESSION:-matrix}
CONSISTENCY=${CONSISTENCY:-1}
QAT=${QAT:-1}
METHOD=${METHOD:-entropy}
CAL_SIZE=${CAL_SIZE:-128}
PARITY=${PARITY:-200}
TARGETS=${TARGETS:-tensorrt cpu}
FP32_BLOCKS=${FP32_BLOCKS-classifier,box_head,box_predictor}
PASS1_FP32_BLOCKS=${PASS1_FP32_BLOCKS-classifier}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
CT=${CTMASK:-.venv/bin/ctmask}
PY=${PYTHON:-.venv/bin/python}
DATA="$RUN/data"
HELD="$OUT/held-out"
"$PY" "$(dirname "$0")/graph_islands.py" "$FP32_BLOCKS"  # a bad name fails now, not after two trainings
"$PY" "$(dirname "$0")/graph_islands.py" "$PASS1_FP32_BLOCKS"
mkdir -p "$OUT"
"$(dirname "$0")/held_out.sh" "$DATA" "$HELD"

train() {  # DIR SEED [train-cls options...]
  local dir=$1 seed=$2; shift 2
  mkdir -p "$dir"
  [ -f "$dir/cls.pt" ] || "$CT" train-cls "$SEG" --preset small --variant heads --head pooled \
    --suppression "$SUPPRESSION" --seed "$seed" --train-split "$DATA/train_COVIDx_CT.txt" \
    --val-split "$DATA/val_COVIDx_CT.txt" --epochs 100 --batch-size 8 --lr 3e-4 --roi-cache "$OUT/roi-cache" \
    --out "$dir/cls.pt" --json "$dir/train-cls.json" -q "$@"
}

int8_graphs() {  # DIR BLOCKS: its FP32 graph, ranges and INT8 graphs (one per target, BLOCKS in FP32)
  local dir=$1 blocks=$2 ranges
  [ -f "$dir/fp32.onnx" ] || "$CT" export "$dir/cls.pt" --out "$dir/fp32.onnx" -q
  [ -f "$dir/base.ranges.json" ] || "$CT" calibrate "$dir/fp32.onnx" --images "$DATA/train_COVIDx_CT.txt" \
    --size "$CAL_SIZE" --method "$METHOD" --out "$dir/base.ranges.json" -q
  ranges="$dir/base.ranges.json"
  if [ "$QAT" = 1 ]; then
    [ -f "$dir/qat.ranges.json" ] || "$CT" qat-ranges "$dir/fp32.onnx" --qat "$SEG" --base "$dir/base.ranges.json" \
      --out "$dir/qat.ranges.json" -q
    ranges="$dir/qat.ranges.json"
  fi
  for t in $TARGETS; do
    if [ -f "$dir/int8-$t.onnx" ]; then  # reused only when made with these FP32 blocks
      "$PY" "$(dirname "$0")/graph_islands.py" "$blocks" "$dir/int8-$t.onnx"
    else
      "$CT" export "$dir/cls.pt" --out "$dir/int8-$t.onnx" --precision int8 --int8-target "$t" \
        --calibration "$ranges" --fp32-blocks "$blocks" --json "$dir/export-int8-$t.json" -q
    fi
  done
}

t0=$(date +%s)
train "$OUT/pass1" 0
int8_graphs "$OUT/pass1" "$PASS1_FP32_BLOCKS"
t1=$(date +%s)
echo "pass 1 (exact head, its INT8 graphs): $((t1 - t0)) s"
FROM=()
for t in $TARGETS; do FROM+=(--rois-from "$OUT/pass1/int8-$t.onnx"); done
S="$OUT/seed$SEED"
train "$S" "$SEED" "${FROM[@]}" --consistency "$CONSISTENCY"
[ -f "$S/eval.json" ] || "$CT" evaluate "$S/cls.pt" --split "$DATA/test_COVIDx_CT.txt" --roi-cache "$OUT/roi-cache" \
  --json "$S/eval.json" -q
int8_graphs "$S" "$FP32_BLOCKS"
t2=$(date +%s)
echo "pass 2 (seed $SEED: head on exact + INT8 RoIs, evaluate, graphs): $((t2 - t1)) s"
GRAPHS=()
for t in $TARGETS; do
  g="int8-$t"
  "$CT" parity "$S/cls.pt" "$S/$g.onnx" --images "$HELD" --max-images "$PARITY" --fp32 "$S/fp32.onnx" \
    --labels "$DATA/test_COVIDx_CT.txt" --json "$S/parity-$g.json" -q > "$S/parity-$g.txt" || true
  echo "$g parity: $(tail -1 "$S/parity-$g.txt")"
  GRAPHS+=("$g")
done
"$PY" "$(dirname "$0")/agreement.py" "$S" "$HELD" "$DATA/test_COVIDx_CT.txt" "${GRAPHS[@]}"
