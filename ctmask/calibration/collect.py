"""Activation ranges of an FP32 graph, measured by onnxruntime's calibrators.

``minmax`` keeps each tensor's extremes; ``entropy`` and ``percentile`` build histograms
and clip outliers (KL divergence, or the given percentile). The tensors calibrated are
the inputs and outputs of the operators INT8 quantizes (:data:`QUANTIZED_OPS`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from ctmask.calibration.ranges import RangesFile, ort_method
from ctmask.calibration.slices import CalibrationSet
from ctmask.core.errors import ConfigError, ModelError
from ctmask.core.graphs import content_sha256, io_problems, load_proto
from ctmask.core.spec import INPUT, GraphSpec

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
"""Operators that run in INT8 by default (Q/DQ on their inputs); everything else stays float."""

RESIDUAL_OPS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool")
"""``ctmask calibrate --ops residual``: the residual ``Add``, ``Relu`` and ``MaxPool`` join,
so onnxruntime keeps whole ResNet blocks in int8. Measured (docs/benchmarks.md): paper preset, batch 8,
2.03x the FP32 graph against 1.83x, but on the small model 58 of 625 class calls changed
against 34, so it is not the default."""

OP_SETS = {"conv": QUANTIZED_OPS, "residual": RESIDUAL_OPS}


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over a decoded calibration set, in batches."""

    def __init__(self, images: np.ndarray, batch_size: int, on_batch: Callable[[int], None] | None):
        self.batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        self.on_batch = on_batch
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        batch = self.batches[self.i]
        self.i += 1
        if self.on_batch:
            self.on_batch(len(batch))
        return {INPUT: batch}

    def __len__(self) -> int:
        return len(self.batches)

    def rewind(self) -> None:
        self.i = 0


def plain_ranges(tensors) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """onnxruntime ``TensorsData`` -> (tensor name -> (lowest, highest) floats, names dropped).

    A tensor with a non-finite range is dropped: the ranking block masks scores with -inf
    (an ``Add`` there is calibrated when ``Add`` is quantized) and is never quantized; if a
    quantized tensor is ever missing, the INT8 export names it.
    """
    out, dropped = {}, []
    for name, data in tensors.items():
        lo, hi = data.range_value
        lo, hi = float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0])
        if np.isfinite(lo) and np.isfinite(hi):
            out[str(name)] = (lo, hi)
        else:
            dropped.append(str(name))
    return out, sorted(dropped)


def check_calibratable(proto: onnx.ModelProto, spec: GraphSpec, model: Path) -> None:
    """Raise unless ``model`` is an FP32 ctmask graph with the contract's inputs and outputs.

    Raises:
        ConfigError: the graph is FP16 / INT8 (calibration measures the FP32 graph).
        ModelError: its inputs or outputs break the contract.
    """
    if spec.precision != "fp32":
        raise ConfigError(f"calibration measures an FP32 graph; this one is {spec.precision}", model,
                          hint="calibrate the FP32 graph (`ctmask export CKPT --out model.onnx`)")
    problems = io_problems(proto, spec)
    if problems:
        raise ModelError("not a ctmask graph: " + "; ".join(problems), model)


def collect_ranges(model: str | Path, spec: GraphSpec, cal: CalibrationSet, method: str = "minmax",
                   batch_size: int = 8, percentile: float = 99.999, num_bins: int = 2048,
                   on_batch: Callable[[int], None] | None = None,
                   op_types: tuple[str, ...] = QUANTIZED_OPS,
                   proto: onnx.ModelProto | None = None) -> RangesFile:
    """Run the FP32 graph ``model`` over the calibration slices and return their ranges.

    Args:
        model: FP32 ctmask ONNX file (its sha256 identifies it in the ranges file).
        spec: its spec (read from the file by the caller).
        cal: decoded calibration slices (:func:`ctmask.calibration.slices.calibration_set`).
        method: ``minmax``, ``entropy`` or ``percentile``.
        batch_size: slices per calibration run.
        percentile: kept percentile of |x| for ``percentile``.
        num_bins: histogram bins for ``entropy`` / ``percentile``.
        on_batch: progress callback (slices in the batch).
        op_types: operators whose tensors are calibrated, and later quantized (the ranges
            file records them).
        proto: ``model`` already loaded (it is read once, for the checks and its hash).

    Raises:
        ConfigError: an unknown method, or a graph that is not FP32.
    """
    from onnxruntime.quantization.calibrate import create_calibrator

    ort_m = ort_method(method)
    proto = proto if proto is not None else load_proto(model)
    check_calibratable(proto, spec, Path(model))
    options: dict = {"op_types": list(op_types), "batch_size": batch_size}
    extra: dict = {}
    if method in ("entropy", "percentile"):
        extra["num_bins"] = num_bins
        options["num_bins"] = num_bins
    if method == "percentile":
        extra["percentile"] = percentile
        options["percentile"] = percentile
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctmask-calib-") as tmp:
        calibrator = create_calibrator(Path(model), list(op_types),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=ort_m, extra_options=extra)
        try:
            calibrator.collect_data(_Reader(cal.images, batch_size, on_batch))
            tensors = calibrator.compute_data()
        except Exception as exc:  # onnxruntime's own exception types
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
            raise ModelError(f"onnxruntime could not run the graph for calibration ({first})", model) from None
        del calibrator
    ranges, dropped = plain_ranges(tensors)
    if dropped:
        options["dropped_non_finite"] = dropped
    if not ranges:
        raise ModelError(f"the graph has no {', '.join(op_types)} tensors to calibrate", model)
    options["seconds"] = round(time.perf_counter() - t0, 2)
    return RangesFile(
        method=method,
        graph_sha256=content_sha256(proto),
        ranges=ranges,
        slices=[s.to_dict() for s in cal.slices],
        options=options,
        graph={"file": str(Path(model).resolve()), "preset": spec.preset, "weights_sha256": spec.weights_sha256,
               "n_nodes": len(proto.graph.node)},
    )
