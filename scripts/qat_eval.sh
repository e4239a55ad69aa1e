#!/usr/bin/env bash
# INT8 of a detector after quantization-aware fine-tuning (`ctmask qat`), judged by its calls:
# the pooled head retrained on the QAT detector (heads variant, cached RoIs), its test accuracy
# and noise floor, the FP32 graph, INT8 graphs of both targets with every detector block
# quantized (only the classifier head stays FP32), from the QAT scales (`ctmask qat-ranges`) and,
# for comparison, from a plain calibration of the same graph; the class agreement of each with
# the FP32 graph on the whole test split, and `ctmask parity` against PyTorch.
# Usage: scripts/qat_eval.sh SEG_QAT RUN OUT  (RUN: a `make accuracy` folder, RUN/data).
# Environment: SEED (0), METHOD (entropy: the base calibration), CAL_SIZE (128), PARITY (200),
# RANGES ("qat base": which ranges files to quantize from), TARGETS ("tensorrt cpu").
set -euo pipefail
SEG=${1:?usage: scripts/qat_eval.sh SEG_QAT RUN OUT}
RUN=${2:?usage: scripts/qat_eval.sh SEG_QAT RUN OUT}
OUT=${3:?usage: scripts/qat_eval.sh SEG_QAT RUN OUT}
SEED=${SEED:-0}
METHOD=${METHOD:-entropy}
CAL_SIZE=${CAL_SIZE:-128}
PARITY=${PARITY:-200}
RANGES=${RANGES:-qat base}
TARGETS=${TARGETS:-tensorrt cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
CT=${CTMASK:-.venv/bin/ctmask}
PY=${PYTHON:-.venv/bin/python}
DATA="$RUN/data"
HELD="$OUT/held-out"
mkdir -p "$OUT"
"$(dirname "$0")/held_out.sh" "$DATA" "$HELD"
t0=$(date +%s)
[ -f "$OUT/cls.pt" ] || "$CT" train-cls "$SEG" --preset small --variant heads --head pooled --seed "$SEED" \
  --train-split "$DATA/train_COVIDx_CT.txt" --val-split "$DATA/val_COVIDx_CT.txt" --epochs 100 \
  --batch-size 8 --lr 3e-4 --roi-cache "$OUT/roi-cache" --out "$OUT/cls.pt" --json "$OUT/train-cls.json" -q
t1=$(date +%s)
[ -f "$OUT/eval.json" ] || "$CT" evaluate "$OUT/cls.pt" --split "$DATA/test_COVIDx_CT.txt" \
  --roi-cache "$OUT/roi-cache" --json "$OUT/eval.json" -q
t2=$(date +%s)
echo "train-cls $((t1 - t0)) s, evaluate $((t2 - t1)) s"
[ -f "$OUT/fp32.onnx" ] || "$CT" export "$OUT/cls.pt" --out "$OUT/fp32.onnx" -q
[ -f "$OUT/base.ranges.json" ] || "$CT" calibrate "$OUT/fp32.onnx" --images "$DATA/train_COVIDx_CT.txt" \
  --size "$CAL_SIZE" --method "$METHOD" --out "$OUT/base.ranges.json" -q
case " $RANGES " in *" qat "*) [ -f "$OUT/qat.ranges.json" ] || "$CT" qat-ranges "$OUT/fp32.onnx" --qat "$SEG" --base "$OUT/base.ranges.json" \
  --out "$OUT/qat.ranges.json" -q ;; esac
GRAPHS=()
for r in $RANGES; do
  for t in $TARGETS; do
    g="int8-$t-$r"
    t0=$(date +%s)
    [ -f "$OUT/$g.onnx" ] || "$CT" export "$OUT/cls.pt" --out "$OUT/$g.onnx" --precision int8 --int8-target "$t" \
      --calibration "$OUT/$r.ranges.json" --fp32-blocks classifier --json "$OUT/export-$g.json" -q
    t1=$(date +%s)
    "$CT" parity "$OUT/cls.pt" "$OUT/$g.onnx" --images "$HELD" --max-images "$PARITY" --fp32 "$OUT/fp32.onnx" \
      --labels "$DATA/test_COVIDx_CT.txt" --json "$OUT/parity-$g.json" -q > "$OUT/parity-$g.txt" || true
    echo "$g: export $((t1 - t0)) s, parity $(($(date +%s) - t1)) s; $(tail -1 "$OUT/parity-$g.txt")"
    GRAPHS+=("$g")
  done
done
# Agreement with the FP32 graph on every test slice (onnxruntime, one pass per graph).
"$PY" "$(dirname "$0")/agreement.py" "$OUT" "$HELD" "$DATA/test_COVIDx_CT.txt" "${GRAPHS[@]}"
