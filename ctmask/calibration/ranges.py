"""The ranges file: activation ranges of one FP32 graph, how they were measured and on what.

JSON, written atomically::

    {"format": "ctmask-ranges/1", "method": "minmax", "options": {...},
     "graph": {"sha256": ..., "file": ..., "preset": ..., "weights_sha256": ...},
     "slices": [{"file": ..., "label": 2, "sha256": ...}, ...],
     "ranges": {"<tensor>": [lowest, highest], ...},
     "ctmask_version": ..., "created": ...}

The ranges describe the model and the data, not a target: every INT8 flavour (TensorRT's
symmetric int8, the CPU's uint8) is quantized from the same file. A file made for another
graph is refused (its sha256 differs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ctmask import __version__
from ctmask.core.errors import ConfigError, RangesError
from ctmask.core.fileio import write_json_atomic

FORMAT = "ctmask-ranges/1"
METHODS = ("minmax", "entropy", "percentile")
KNOWN_OPS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool")
MAX_ABS = 1e6
"""Largest |range| accepted: activations of this model are O(10-100); a range beyond this
is corrupt (its int8 scale would lose every value, and beyond 3.4e38 it is inf in float32)."""


RESIDUAL_FORMS = ("float", "int8")
"""What an INT8 graph's residual and top-down paths (a ResNet block's identity path, the FPN's
top-down upsampling: the readers of a convolution's quantized input that are not quantized
themselves) read, ``options.residual``: ``float``, the tensor as it is (ModelOpt's
``input_quantizer`` rounds that module's input only); ``int8``, the tensor as the convolution
reads it, rounded once for every reader. ``int8`` is the Q/DQ graph onnxruntime's quantizer
writes before :func:`ctmask.exporter.precision.float_for_unquantized_readers`, and the placement
TensorRT's and OpenVINO's int8 kernels fuse (a convolution with its residual add in int8); a QAT
fine-tune trains it with :func:`ctmask.training.qat.quantize_shared_reads`."""


def ort_method(name: str):
    """onnxruntime's ``CalibrationMethod`` for a ctmask method name."""
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if name not in table:
        raise ConfigError(f"unknown calibration method {name!r}; expected one of {', '.join(METHODS)}")
    return table[name]


CALIBRATE_HINT = "calibrate this graph: `ctmask calibrate MODEL.onnx --images DIR --out ranges.json`"


@dataclass
class RangesFile:
    """Activation ranges of one graph.

    Attributes:
        method: calibration method (one of :data:`METHODS`).
        graph_sha256: sha256 of the FP32 graph the ranges were measured on.
        ranges: tensor name -> (lowest, highest), float (what the quantizer reads).
        slices: the calibration slices (file, label, sha256).
        options: calibrator options (percentile, bins, symmetric ...).
        graph: more about the graph (file, preset, weights digest), for people.
    """

    method: str
    graph_sha256: str
    ranges: dict[str, tuple[float, float]]
    slices: list[dict]
    options: dict = field(default_factory=dict)
    graph: dict = field(default_factory=dict)
    created: str = ""
    version: str = __version__

    def tensors_data(self):
        """The ranges as onnxruntime's ``TensorsData`` (what its quantizer reads)."""
        import numpy as np
        from onnxruntime.quantization.calibrate import TensorData, TensorsData

        return TensorsData(ort_method(self.method), {
            name: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            for name, (lo, hi) in self.ranges.items()})

    def content_sha256(self) -> str:
        """sha256 of what quantization reads (method, operators, ranges): the ranges' identity."""
        import hashlib

        key = json.dumps({"method": self.method, "op_types": self.options.get("op_types"),
                          "ranges": {k: [float(v[0]), float(v[1])] for k, v in sorted(self.ranges.items())}},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "options": self.options,
            "graph": {**self.graph, "sha256": self.graph_sha256},
            "slices": self.slices,
            "ranges": {name: [float(r[0]), float(r[1])] for name, r in sorted(self.ranges.items())},
            "ctmask_version": self.version,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, path: str | Path) -> Path:
        write_json_atomic(path, self.to_dict())
        return Path(path)

    def check_graph(self, graph_sha256: str, path: str | Path, graph_name: str = "the graph",
                    hint: str = CALIBRATE_HINT) -> None:
        """Raise :class:`RangesError` unless the ranges were measured on the graph of that sha256
        (naming ``path``, the ranges file, and ``graph_name``; ``hint``: what to do instead)."""
        if self.graph_sha256 != graph_sha256:
            made_for = self.graph.get("file") or "another graph"
            raise RangesError(
                f"ranges were measured on {made_for} (sha256 {self.graph_sha256[:12]}...), not on {graph_name} "
                f"(sha256 {graph_sha256[:12]}...); INT8 scales from another graph would be wrong",
                path, hint=hint)


def load_ranges(path: str | Path) -> RangesFile:
    """Read a ranges file.

    Raises:
        RangesError: missing, not JSON, not a ctmask ranges file, or malformed (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise RangesError("ranges file does not exist", path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RangesError(f"not a JSON ranges file ({exc.__class__.__name__}: {exc})", path) from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise RangesError(f"not a ctmask ranges file (format {found!r}, expected {FORMAT!r})", path)
    try:
        method = d["method"]
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        ranges = {str(name): _pair(value) for name, value in dict(d["ranges"]).items()}
        options = d.get("options", {})
        if not isinstance(options, dict):
            raise TypeError(f"options must be a JSON object, got {type(options).__name__}")
        options = dict(options)
        op_types = options.get("op_types")
        if op_types is not None and (not isinstance(op_types, list) or not op_types
                                     or not set(op_types) <= set(KNOWN_OPS)):
            raise ValueError(f"options.op_types must be a list of {', '.join(KNOWN_OPS)}, got {op_types!r}")
        if options.get("residual", "float") not in RESIDUAL_FORMS:
            raise ValueError(f"options.residual must be one of {', '.join(RESIDUAL_FORMS)}, got "
                             f"{json.dumps(options['residual'])}")
        if not isinstance(d["slices"], list) or not all(isinstance(x, dict) and "file" in x for x in d["slices"]):
            raise ValueError("slices must be a list of {file, label, sha256}")
        rf = RangesFile(method=method, graph_sha256=str(d["graph"]["sha256"]), ranges=ranges,
                        slices=list(d["slices"]), options=options, graph=dict(d["graph"]),
                        created=str(d.get("created", "")), version=str(d.get("ctmask_version", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RangesError(f"malformed ranges file ({exc.__class__.__name__}: {exc})", path) from None
    bad = [name for name, (lo, hi) in ranges.items() if not (abs(lo) <= MAX_ABS and abs(hi) <= MAX_ABS and lo <= hi)]
    if not ranges or bad:
        raise RangesError("ranges file holds no ranges" if not ranges else
                          f"{len(bad)} tensor range(s) are not finite, beyond +-{MAX_ABS:g} or have lowest > highest "
                          f"(e.g. {bad[0]!r}: {ranges[bad[0]]})", path)
    return rf


def _pair(value) -> tuple[float, float]:
    """``[lowest, highest]`` as two floats; numbers only (no strings, no booleans)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"a range must be [lowest, highest] numbers, got {value!r}")
    return float(value[0]), float(value[1])
