#!/usr/bin/env bash
# Speed of the pooled head's reduced-precision graphs at paper size (docs/model.md, "Stable head"):
# an untrained paper-preset model with the pooled head (weights do not change speed), its FP32,
# FP16 and INT8 (cpu and tensorrt forms) graphs, all in one `ctmask bench` run on onnxruntime
# and OpenVINO, batch 8, on test slices.
# Usage: scripts/bench_heads.sh RUN OUT  (RUN: a `ctmask synth` / `make accuracy` folder with data/)
# Environment: SUPPRESSION (nms | matrix: the ranked RoIs' suppression), ALSO (more graphs for the same
# bench run, e.g. another run's fp32.onnx), BENCH (0: make the graphs only), RESIDUALS ("float": the
# INT8 graphs' residual forms, `export --residual`; "float int8" also writes int8-<target>-r8.onnx),
# FP32_BLOCKS (classifier: the INT8 graphs' `--fp32-blocks`), TAG (with FP32_BLOCKS: int8-<target>[-r8]-TAG.onnx).
set -euo pipefail
RUN=${1:?usage: scripts/bench_heads.sh RUN OUT}
OUT=${2:?usage: scripts/bench_heads.sh RUN OUT}
SUPPRESSION=${SUPPRESSION:-nms}
ALSO=${ALSO:-}
BENCH=${BENCH:-1}
RESIDUALS=${RESIDUALS:-float}
FP32_BLOCKS=${FP32_BLOCKS-classifier}
[[ "${TAG:-}" =~ ^[A-Za-z0-9._-]*$ ]] || { echo "TAG '$TAG': letters, digits, '.', '_' and '-' only" >&2; exit 2; }
TAG=${TAG:+-$TAG}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
CT=${CTMASK:-.venv/bin/ctmask}
PY=${PYTHON:-.venv/bin/python}
"$PY" "$(dirname "$0")/graph_islands.py" "$FP32_BLOCKS"
DATA="$RUN/data"
mkdir -p "$OUT/held"
head -16 "$DATA/test_COVIDx_CT.txt" | while read -r name _; do
  ln -sf "$(cd "$DATA/images" && pwd)/$name" "$OUT/held/$name"
done
"$PY" - "$OUT/paper-pooled.pt" "$SUPPRESSION" <<'EOF'
import dataclasses, sys

import torch

from ctmask.core.presets import PAPER
from ctmask.training.checkpoint import save_checkpoint
from ctmask.training.model import CovidCTMaskNet

torch.manual_seed(0)
preset = dataclasses.replace(PAPER, head="pooled", roi_suppression=sys.argv[2])
model = CovidCTMaskNet(preset)
save_checkpoint(sys.argv[1], kind="classifier", preset=preset, model=model.state_dict_for_checkpoint(),
                config={"note": "untrained seed-0 weights, for speed measurements only"})
EOF
CK="$OUT/paper-pooled.pt"
[ -f "$OUT/fp32.onnx" ] || "$CT" export "$CK" --out "$OUT/fp32.onnx" -q
[ -f "$OUT/fp32.ranges.json" ] || "$CT" calibrate "$OUT/fp32.onnx" --images "$DATA/train_COVIDx_CT.txt" --size 16 \
  --out "$OUT/fp32.ranges.json" -q
# Islands as the small model's measurement chose them (weights untrained: nothing to measure here).
[ -f "$OUT/fp16.onnx" ] || "$CT" export "$CK" --out "$OUT/fp16.onnx" --precision fp16 --fp32-blocks none -q
INT8=()
for r in $RESIDUALS; do
  suffix=$([ "$r" = float ] && echo "" || echo "-r8")
  for t in cpu tensorrt; do
    g="$OUT/int8-$t$suffix$TAG.onnx"
    if [ -f "$g" ]; then  # reused only when made with these FP32 blocks
      "$PY" "$(dirname "$0")/graph_islands.py" "$FP32_BLOCKS" "$g"
    else
      "$CT" export "$CK" --out "$g" --precision int8 --int8-target "$t" --residual "$r" \
        --calibration "$OUT/fp32.ranges.json" --fp32-blocks "$FP32_BLOCKS" -q
    fi
    INT8+=("$g")
  done
done
[ "$BENCH" = 1 ] || exit 0
# shellcheck disable=SC2086
"$CT" bench $ALSO "$OUT/fp32.onnx" "${INT8[@]}" "$OUT/fp16.onnx" -b 8 \
  --iterations 5 --warmup 1 --backend onnxruntime-cpu --backend openvino-cpu --images "$OUT/held" \
  --json "$OUT/bench.json" | tee "$OUT/bench.txt"
