#!/usr/bin/env bash
# Deployment half of the demo: export the trained classifier to ONNX (FP32, then FP16 with
# measured FP32 islands and INT8 for the CPU from calibrated ranges), predict the held-out
# test slices with the torch-free runtime, check parity of every graph against PyTorch and
# benchmark them side by side. Usage: scripts/deploy.sh OUT  (OUT holds cls.pt and data/ from
# scripts/train_eval.sh); needs `make install`.
set -euo pipefail
OUT=${1:?usage: scripts/deploy.sh OUT}
CT=${CTMASK:-.venv/bin/ctmask}
DATA="$OUT/data"
HELD="$OUT/held-out"

# The test split's slices, by link, in one folder (the model never saw them in training).
"$(dirname "$0")/held_out.sh" "$DATA" "$HELD"

"$CT" export "$OUT/cls.pt" --out "$OUT/model.onnx" --json "$OUT/export.json"
"$CT" infer "$OUT/model.onnx" "$HELD" --batch-size 8 --out "$OUT/predictions.jsonl" -q --json "$OUT/infer.json"
"$CT" parity "$OUT/cls.pt" "$OUT/model.onnx" --images "$HELD" --max-images 64 --json "$OUT/parity.json" -q
# What TensorRT's parser and builder will demand of the graph, checked without a GPU.
"$CT" check-trt "$OUT/model.onnx" --json "$OUT/check-trt.json" > /dev/null
# Real scans: synthetic patients as DICOM series (no file suffix, as a PACS export), predicted per
# slice and per study, with overlays and a self-contained HTML report.
"$CT" synth "$OUT/scans" --dicom --patients 4 --slices-per-patient 12 -q
"$CT" infer "$OUT/model.onnx" "$OUT/scans/dicom" --out "$OUT/scans/slices.jsonl" --studies "$OUT/scans/studies.csv" \
  --overlays "$OUT/scans/overlays" --report "$OUT/report.html" -q
# The same scans on Ray Data (a local cluster, started and stopped here): byte-identical output.
"$CT" infer "$OUT/model.onnx" "$OUT/scans/dicom" --ray --out "$OUT/scans/slices-ray.jsonl" \
  --overlays "$OUT/scans/overlays" -q --json "$OUT/infer-ray.json"
cmp "$OUT/scans/slices.jsonl" "$OUT/scans/slices-ray.jsonl"
# A Triton Inference Server model repository for the graph, checked against Triton's schema.
rm -rf "$OUT/triton"
"$CT" export "$OUT/model.onnx" --triton-repo "$OUT/triton" -q
"$CT" check-triton "$OUT/triton"
# Reduced precision: calibration and the islands' measurement use the training split.
"$CT" calibrate "$OUT/model.onnx" --images "$DATA/train_COVIDx_CT.txt" --out "$OUT/model.ranges.json" -q
"$CT" export "$OUT/cls.pt" --out "$OUT/model.fp16.onnx" --precision fp16 --calibration "$DATA/train_COVIDx_CT.txt" \
  --measure-size 100 --json "$OUT/export-fp16.json" -q
# The ranges were measured on model.onnx: the export's FP32 graph is the same file (same sha256),
# so nothing is calibrated again; the islands are measured on the ranges file's own slices.
"$CT" export "$OUT/cls.pt" --out "$OUT/model.int8.onnx" --precision int8 --int8-target cpu \
  --calibration "$OUT/model.ranges.json" --json "$OUT/export-int8.json" -q
for p in fp16 int8; do
  "$CT" parity "$OUT/cls.pt" "$OUT/model.$p.onnx" --images "$HELD" --max-images 90 --fp32 "$OUT/model.onnx" \
    --labels "$DATA/test_COVIDx_CT.txt" --json "$OUT/parity-$p.json" -q ||
    echo "the $p graph did NOT pass parity (see $OUT/parity-$p.json): deploy the FP32 graph, or measure the" \
         "islands on more slices (--measure-size)" >&2
done
"$CT" bench "$OUT/model.onnx" "$OUT/model.fp16.onnx" "$OUT/model.int8.onnx" --checkpoint "$OUT/cls.pt" \
  --batch-size 1 --batch-size 8 --iterations 10 --json "$OUT/bench.json" -q
