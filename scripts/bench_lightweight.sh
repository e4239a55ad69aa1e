#!/usr/bin/env bash
# Speed of the reference's lightweight ResNet18 model (preset resnet18-t1) against the paper's model
# (docs/benchmarks.md, "Lightweight model"): untrained seed-0 weights of both (weights do not change
# speed), exported FP32 graphs at 512 x 512, one `ctmask bench` run on onnxruntime and OpenVINO,
# batch 8, on synthetic slices. The paper graph comes first: its FP32 is the baseline the ratios use.
# The small preset (192 x 192 input: another input size, so a second run) is measured the same way.
# Usage: scripts/bench_lightweight.sh OUT
set -euo pipefail
OUT=${1:?usage: scripts/bench_lightweight.sh OUT}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
CT=${CTMASK:-.venv/bin/ctmask}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
for preset in paper resnet18-t1 small; do
  "$PY" - "$preset" "$OUT/$preset.pt" <<'PYEOF'
import sys

import torch

from ctmask.core.presets import get_preset
from ctmask.training.checkpoint import save_checkpoint
from ctmask.training.model import CovidCTMaskNet

torch.manual_seed(0)
preset = get_preset(sys.argv[1])
model = CovidCTMaskNet(preset)
save_checkpoint(sys.argv[2], kind="classifier", preset=preset, model=model.state_dict_for_checkpoint(),
                config={"note": "untrained seed-0 weights, for speed measurements only"})
PYEOF
  [ -f "$OUT/$preset.onnx" ] || "$CT" export "$OUT/$preset.pt" --out "$OUT/$preset.onnx" -q
done
"$CT" model-info --preset resnet18-t1 --json "$OUT/model-info-resnet18-t1.json" >/dev/null
"$CT" bench "$OUT/paper.onnx" "$OUT/resnet18-t1.onnx" -b 8 --iterations 3 --warmup 1 \
  --backend onnxruntime-cpu --backend openvino-cpu --json "$OUT/bench.json" | tee "$OUT/bench.txt"
"$CT" bench "$OUT/small.onnx" -b 8 --iterations 3 --warmup 1 \
  --backend onnxruntime-cpu --backend openvino-cpu --json "$OUT/bench-small.json" | tee "$OUT/bench-small.txt"
