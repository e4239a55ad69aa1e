#!/usr/bin/env bash
# Reduced precision of one classifier checkpoint, judged by its calls (docs/model.md, "Stable head"):
# the FP32 graph, an FP16 graph and INT8 graphs for both targets (calibrated on class-balanced
# training slices with METHOD), each exported with measured FP32 islands; the class agreement
# of each with the FP32 graph on the whole test split, and `ctmask parity` against PyTorch.
# Usage: scripts/stable_precision.sh CKPT RUN OUT
#   CKPT: a classifier checkpoint; RUN: its `make accuracy` folder (RUN/data); OUT: created.
# Environment: METHOD (minmax | entropy | percentile, default percentile), CAL_SIZE (calibration
# slices, default 128), MEASURE (island measurement slices, default 200), PARITY (parity slices,
# default 200), PRECISIONS (default "fp16 int8-tensorrt int8-cpu").
set -euo pipefail
CKPT=${1:?usage: scripts/stable_precision.sh CKPT RUN OUT}
RUN=${2:?usage: scripts/stable_precision.sh CKPT RUN OUT}
OUT=${3:?usage: scripts/stable_precision.sh CKPT RUN OUT}
METHOD=${METHOD:-percentile}
CAL_SIZE=${CAL_SIZE:-128}
MEASURE=${MEASURE:-200}
PARITY=${PARITY:-200}
PRECISIONS=${PRECISIONS:-fp16 int8-tensorrt int8-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
CT=${CTMASK:-.venv/bin/ctmask}
PY=${PYTHON:-.venv/bin/python}
DATA="$RUN/data"
HELD="$OUT/held-out"
mkdir -p "$OUT"
"$(dirname "$0")/held_out.sh" "$DATA" "$HELD"

[ -f "$OUT/fp32.onnx" ] || "$CT" export "$CKPT" --out "$OUT/fp32.onnx" -q
[ -f "$OUT/fp32.ranges.json" ] || "$CT" calibrate "$OUT/fp32.onnx" --images "$DATA/train_COVIDx_CT.txt" \
  --size "$CAL_SIZE" --method "$METHOD" --out "$OUT/fp32.ranges.json" -q
for p in $PRECISIONS; do
  t0=$(date +%s)
  case $p in
    fp16) "$CT" export "$CKPT" --out "$OUT/$p.onnx" --precision fp16 --calibration "$DATA/train_COVIDx_CT.txt" \
            --measure-size "$MEASURE" --json "$OUT/export-$p.json" -q ;;
    int8-*) "$CT" export "$CKPT" --out "$OUT/$p.onnx" --precision int8 --int8-target "${p#int8-}" \
              --calibration "$OUT/fp32.ranges.json" --json "$OUT/export-$p.json" -q ;;
  esac
  t1=$(date +%s)
  "$CT" parity "$CKPT" "$OUT/$p.onnx" --images "$HELD" --max-images "$PARITY" --fp32 "$OUT/fp32.onnx" \
    --labels "$DATA/test_COVIDx_CT.txt" --json "$OUT/parity-$p.json" -q > "$OUT/parity-$p.txt" || true
  echo "$p: export $((t1 - t0)) s, parity $(($(date +%s) - t1)) s; $(tail -1 "$OUT/parity-$p.txt")"
done
# Agreement with the FP32 graph on every test slice (onnxruntime, one pass per graph).
"$PY" - "$OUT" "$HELD" "$DATA/test_COVIDx_CT.txt" $PRECISIONS <<'EOF'
import json, sys
from pathlib import Path

import numpy as np

from ctmask.core.graphs import load_proto
from ctmask.exporter.precision import graph_blocks
from ctmask.exporter.sensitivity import run_graph
from ctmask.runtime.predict import collect_images
from ctmask.scans.batch import load_batch
from ctmask.runtime.runner import OnnxRuntimeRunner
from ctmask.backends.parity import slice_labels

out, held, split, precisions = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
files, _ = collect_images([held])
with OnnxRuntimeRunner(out / "fp32.onnx") as r:
    spec = r.spec
loaded = load_batch(files, spec)
images, ok, bad = loaded.batch, loaded.paths, loaded.failures
y = slice_labels(ok, split)
ref = run_graph(load_proto(out / "fp32.onnx"), images)["logits"].argmax(-1)
summary = {"n": len(ok), "fp32_accuracy": float(np.mean(ref == y))}
print(f"FP32 graph: accuracy {summary['fp32_accuracy']:.2%} on {len(ok)} test slices")
for p in precisions:
    proto = load_proto(out / f"{p}.onnx")
    meta = {m.key: m.value for m in proto.metadata_props}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    produced = {o: n for n in proto.graph.node for o in n.output}
    quantized = sum(1 for n in convs if n.input[0] in produced and produced[n.input[0]].op_type == "DequantizeLinear")
    w16 = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == 10)
    w32 = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == 1)
    calls = run_graph(proto, images)["logits"].argmax(-1)
    changed = int((calls != ref).sum())
    summary[p] = {"agreement": 1 - changed / len(ok), "changed": changed, "accuracy": float(np.mean(calls == y)),
                  "convs": len(convs), "convs_quantized": quantized, "fp16_weights": w16, "fp32_weights": w32,
                  "fp32_islands": sorted(json.loads(meta.get("ctmask.fp32_islands", "{}")))}
    s = summary[p]
    print(f"{p:<14} agreement with FP32 {s['agreement']:.2%} ({changed} of {len(ok)} calls changed), accuracy "
          f"{s['accuracy']:.2%}; convolutions with int8 input {quantized} of {len(convs)}; weights float16 {w16:,} "
          f"/ float32 {w32:,}; FP32 islands {', '.join(s['fp32_islands'])}")
(out / "agreement.json").write_text(json.dumps(summary, indent=2))
EOF
