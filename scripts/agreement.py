"""Class-call agreement of reduced-precision graphs with their FP32 graph on every test slice.

Usage: python scripts/agreement.py OUT HELD SPLIT GRAPH...  (OUT holds fp32.onnx, eval.json and
GRAPH.onnx / parity-GRAPH.json for each GRAPH; HELD: the test slices; SPLIT: their labels).
Writes OUT/agreement.json (merged into an existing one: other graphs' entries stay) and prints one
line per graph (onnxruntime, one pass per graph). With BACKEND=openvino the reduced graphs run on
OpenVINO instead (against the same onnxruntime FP32 graph's calls), written to
OUT/agreement-openvino.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from ctmask.backends.parity import slice_labels
from ctmask.core.fileio import sha256_file, write_json_atomic
from ctmask.core.graphs import load_proto
from ctmask.exporter.sensitivity import run_graph
from ctmask.runtime.predict import collect_images
from ctmask.runtime.runner import OnnxRuntimeRunner
from ctmask.scans.batch import load_batch


def int8_convolutions(proto) -> tuple[int, int]:
    """(convolutions reading a dequantized input, all convolutions) of a graph."""
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    produced = {o: n for n in proto.graph.node for o in n.output}
    quantized = sum(1 for n in convs if n.input[0] in produced and produced[n.input[0]].op_type == "DequantizeLinear")
    return quantized, len(convs)


def calls_of(path: Path, images: np.ndarray, backend: str) -> np.ndarray:
    """Class calls of the graph at ``path`` on ``images``, on onnxruntime or OpenVINO (batches of 16)."""
    if backend == "onnxruntime":
        return run_graph(load_proto(path), images)["logits"].argmax(-1)
    from ctmask.core.spec import INPUT
    from ctmask.runtime.openvino_runner import OpenVinoRunner

    with OpenVinoRunner(path) as runner:
        return np.concatenate([runner.infer({INPUT: images[i:i + 16]})["logits"].argmax(-1)
                               for i in range(0, len(images), 16)])


def main(out: Path, held: str, split: str, graphs: list[str]) -> None:
    backend = os.environ.get("BACKEND", "onnxruntime")
    files, _ = collect_images([held])
    with OnnxRuntimeRunner(out / "fp32.onnx") as r:
        spec = r.spec
    loaded = load_batch(files, spec)
    images, ok = loaded.batch, loaded.paths
    y = slice_labels(ok, split)
    ref = run_graph(load_proto(out / "fp32.onnx"), images)["logits"].argmax(-1)
    ev = json.loads((out / "eval.json").read_text())
    slices = hashlib.sha256("\n".join(sorted(Path(p).name for p in ok)).encode()).hexdigest()
    summary = {"n": len(ok), "fp32_sha256": sha256_file(out / "fp32.onnx"), "slices_sha256": slices,
               "fp32_accuracy": float(np.mean(ref == y)),
               "pytorch_accuracy": ev["accuracy"],
               "pytorch_covid19_sensitivity": ev["per_class"]["covid19"]["sensitivity"],
               "noise_floor": {str(x["gray_levels"]): x["changed_calls"] for x in ev["noise_floor"]["levels"]}}
    print(f"PyTorch: accuracy {ev['accuracy']:.2%}, COVID-19 sensitivity "
          f"{summary['pytorch_covid19_sensitivity']:.2%}, noise floor {summary['noise_floor']}; FP32 graph: "
          f"accuracy {summary['fp32_accuracy']:.2%} on {len(ok)} slices")
    cov = y == 2
    for g in graphs:
        proto = load_proto(out / f"{g}.onnx")
        quantized, convs = int8_convolutions(proto)
        calls = calls_of(out / f"{g}.onnx", images, backend)
        changed = int((calls != ref).sum())
        parity_file = out / f"parity-{g}.json"
        parity = json.loads(parity_file.read_text()) if parity_file.exists() else {}
        s = summary[g] = {"graph_sha256": sha256_file(out / f"{g}.onnx"), "agreement": 1 - changed / len(ok),
                          "changed": changed,
                          "accuracy": float(np.mean(calls == y)),
                          "covid19_sensitivity": float(np.mean(calls[cov] == 2)),
                          "convs": convs, "convs_quantized": quantized,
                          "parity": parity.get("verdict", parity.get("passed"))}
        print(f"{g:<22} ({backend}) agreement with FP32 {s['agreement']:.2%} ({changed} of {len(ok)} calls "
              f"changed), accuracy "
              f"{s['accuracy']:.2%}, COVID-19 sensitivity {s['covid19_sensitivity']:.2%}; convolutions with int8 "
              f"input {quantized} of {convs}; parity {s['parity']}")
    summary["backend"] = backend
    name = "agreement.json" if backend == "onnxruntime" else f"agreement-{backend}.json"
    path = out / name
    # Another run's graphs (e.g. fp16 after the int8 ones) stay in the file, this run's replace theirs,
    # when that run measured against the same FP32 graph on the same slices; else the file starts afresh.
    try:
        kept = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        kept = None
    key = ("fp32_sha256", "n", "slices_sha256")
    if kept is None or not isinstance(kept, dict) or any(kept.get(k) != summary[k] for k in key):
        if kept:
            print(f"{path}: its other entries were measured against another FP32 graph or other slices (or the "
                  "file is not an agreement summary): not kept")
        kept = {}
    write_json_atomic(path, {**kept, **summary})


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
