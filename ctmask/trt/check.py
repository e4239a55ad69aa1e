"""``ctmask check-trt``: what TensorRT's ONNX parser and builder will demand of a graph,
decided without a GPU and without TensorRT.

The rules and where each comes from are in :mod:`ctmask.trt.support` (operator matrix,
limits, restriction checks). :mod:`ctmask.trt.fold` reads the graph (types and shapes by ONNX shape
inference, once with the batch symbolic and once with it set to the optimisation profile's
``max_batch``), folds what can be known before the build (initializers, Constant nodes,
Shape of tensors whose dimensions are static at that batch, and integer arithmetic on
them); this module and :mod:`ctmask.trt.rules` (the per-node rules) report one
:class:`Finding` per violation, naming the ONNX node:

1. the op is in the matrix of the TensorRT major, for its element types, within the
   restrictions the matrix states (unknown domains are fatal unless the op is a plugin);
2. the default-domain opset is in the major's range;
3. only dimension 0 of ``images`` (the batch) is dynamic; output dimensions resolve;
4. TopK's K is at most 3840 (resolved statically, at ``max_batch`` when it depends on it);
5. NonMaxSuppression's candidates per batch item are within INMSLayer's TopK box limit
   (5000; 2000 on SM 5.3 / 6.2); ``max_output_boxes_per_class`` of INT64 max is clamped;
6. RoiAlign needs the ``ROIAlign_TRT`` plugin of ``libnvinfer_plugin``;
7. INT64: native since TensorRT 9.0, except where the importer narrows to INT32 (an
   out-of-range constant there is fatal, the NMS sentinel is not);
8. Q/DQ: INT8 (FP8 / INT4) only, zero-point 0, positive finite constant scales, per-axis
   scales on weights with an explicit axis of the right length;
9. strong typing (ctmask builds TensorRT 10 networks with STRONGLY_TYPED, 11 has nothing
   else): inputs that one TensorRT layer takes as one type must have one type;
10. tensors above 2^31 - 1 elements at ``max_batch``.

Severities: ``fatal`` (the parser or builder refuses, or the engine computes something else
than the ONNX graph), ``warning`` (works under a condition the check cannot see), ``info``.

Imports only onnx, numpy, the standard library and :mod:`ctmask.core` (no torch, no
onnxruntime, no TensorRT).
"""


from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ctmask.core.errors import FATAL, INFO, SEVERITIES, WARNING, ConfigError, Finding, ModelError
from ctmask.core.graphs import load_proto
from ctmask.core.spec import INPUT
from ctmask.trt.fold import DEFAULT_DOMAINS, GraphFacts, dims_of, numel
from ctmask.trt.rules import Checks, check_node
from ctmask.trt.support import CLAMPED_SENTINELS, INT32_MAX, INT64_NARROWED, MAX_VOLUME, TABLES, TrtTable

__all__ = ["FATAL", "INFO", "SEVERITIES", "WARNING", "Finding", "check_graph", "fatal", "format_findings"]

GRAPH = "<graph>"
"""Node name of findings about the whole graph (opset, INT64 summary)."""


def fatal(findings: list[Finding]) -> list[Finding]:
    """The findings that stop a TensorRT build (or make its engine wrong)."""
    return [f for f in findings if f.severity == FATAL]


def format_findings(findings: list[Finding]) -> str:
    """One line per finding, then a summary line."""
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    verdict = ("TensorRT would refuse this graph, or compute something else" if counts[FATAL]
               else "nothing TensorRT would refuse")
    summary = f"{counts[FATAL]} fatal, {counts[WARNING]} warning(s), {counts[INFO]} info: {verdict}"
    return "\n".join([*(str(f) for f in findings), summary])

# ---- the checks ----------------------------------------------------------------------------


def _run(g: GraphFacts, table: TrtTable) -> list[Finding]:
    """Every rule over one graph for one TensorRT major, fatal findings first."""
    c = Checks(g, table)
    if g.inference_error:
        c.add(WARNING, GRAPH, "shape inference", f"ONNX shape inference failed ({g.inference_error}): types "
                                              "and shapes are the declared ones only, checks are partial")
    _opset(c)
    _io(c)
    for node in g.graph.node:
        check_node(c, node)
    _uint8_internal(c)
    _int64(c)
    _volumes(c)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(c.findings, key=lambda f: order[f.severity])


# 2. opset
def _opset(c: Checks) -> None:
    t, opset = c.table, c.g.opset
    if opset is None:
        c.add(FATAL, GRAPH, "opset", "the model imports no default-domain (ai.onnx) opset")
    elif opset in t.opset_notes:  # only some releases of the major parse it
        severity, why = t.opset_notes[opset]
        c.add(severity, GRAPH, "opset", why)
    elif t.opset_min <= opset <= t.opset_max:
        c.add(INFO, GRAPH, "opset", f"opset {opset}: within TensorRT {t.version}.x's {t.opset_min}.."
                                    f"{t.opset_max}")
    else:
        c.add(FATAL, GRAPH, "opset", f"opset {opset} is outside TensorRT {t.version}.x's range {t.opset_min}.."
                                     f"{t.opset_max}: re-export with `ctmask export --opset 18`")


# 3. dynamic dimensions
def _io(c: Checks) -> None:
    g = c.g
    for vi in g.inputs:
        dims = dims_of(vi)
        if dims is None:
            c.add(FATAL, vi.name, "graph input", "no declared shape: TensorRT needs the rank and every "
                                                 "dimension but the batch")
            continue
        bad = []
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                continue
            if vi.name == INPUT and i == 0:
                continue
            what = f"symbolic {d!r}" if isinstance(d, str) else ("0" if d == 0 else "unknown")
            bad.append(f"dimension {i} is {what}")
        if bad:
            c.add(FATAL, vi.name, "graph input", f"{'; '.join(bad)}: only dimension 0 of '{INPUT}' (the batch) "
                                                 "may be dynamic (one optimisation profile over the batch)")
        t = g.type_name(vi.name)
        if t == "DOUBLE":
            c.add(WARNING, vi.name, "graph input", "DOUBLE input: TensorRT casts DOUBLE down to FP32")
        elif t is not None and t not in ("FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"):
            c.add(FATAL, vi.name, "graph input", f"{t} is not a TensorRT network input type")
    for vi in g.graph.output:
        declared = dims_of(vi) or ()
        inferred = g.shapes.get(vi.name, declared)
        for i, d in enumerate(declared):
            if i == 0 or isinstance(d, int):
                continue
            got = inferred[i] if i < len(inferred) else None
            if not isinstance(got, int):
                c.add(WARNING, vi.name, "graph output",
                      f"dimension {i} is declared {d!r} and shape inference cannot resolve it "
                      f"({got!r}): only the batch should be dynamic")


# internal UINT8
def _uint8_internal(c: Checks) -> None:
    g = c.g
    for node in g.graph.node:
        if node.op_type == "QuantizeLinear":
            continue
        for o in node.output:
            if o and g.type_name(o) == "UINT8" and o not in g.output_names:
                c.add_node(FATAL, node, f"output '{o}' is UINT8: TensorRT supports UINT8 only as a network "
                                        "input or output type")


# 7. INT64
def _int64(c: Checks) -> None:
    g = c.g
    n64 = sum(1 for t in g.types.values() if t == onnx.TensorProto.INT64)
    narrowed = []
    for node in g.graph.node:
        ports = INT64_NARROWED.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
        for i, how in (ports or {}).items():
            if i >= len(node.input) or not node.input[i] or g.type_name(node.input[i]) != "INT64":
                continue
            if node.op_type.startswith("Gather") and g.type_name(node.input[0]) == "INT64":
                continue  # INT64 data keeps INT64 indices
            narrowed.append(f"{g.label(node)} ({node.op_type}) input {i}")
            v = g.value(node.input[i])
            if v is None or (node.op_type, i) in CLAMPED_SENTINELS:
                continue
            v = np.asarray(v)
            if v.size and (v.max() > INT32_MAX or v.min() < -INT32_MAX - 1):
                c.add_node(FATAL, node, f"INT64 constant '{node.input[i]}' holds values outside INT32 "
                                        f"(max {int(v.max())}, min {int(v.min())}) and the importer {how}")
    if not n64:
        return
    shown = "; ".join(narrowed[:6]) + (f"; and {len(narrowed) - 6} more" if len(narrowed) > 6 else "")
    where = f": {shown}" if narrowed else ""
    c.add(INFO, GRAPH, "INT64", f"{n64} INT64 tensors: TensorRT {c.table.version} keeps INT64 natively (the "
                                f"ONNX parser stopped casting INT64 down in 9.0); the importer narrows to INT32 "
                                f"at {len(narrowed)} input(s){where}")


# 10. volumes
def _volumes(c: Checks) -> None:
    g = c.g
    seen = set()
    for node in g.graph.node:
        for o in node.output:
            dims = g.fixed_dims(o)
            if not o or o in seen or dims is None or not all(isinstance(d, int) for d in dims):
                continue
            seen.add(o)
            n = numel(dims)
            if n > MAX_VOLUME:
                severity = FATAL if node.op_type == "TopK" or any(
                    c.op_type == "TopK" for c, _ in g.consumers.get(o, [])) else WARNING
                c.add_node(severity, node, f"'{o}' has {n:,} elements at batch {g.max_batch} (> 2^31 - 1): "
                                           "above TensorRT's documented volume limit")


def _load(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    return load_proto(path), path


MAX_CHECK_BATCH = 4096
"""Largest ``max_batch`` judged: ctmask's engine profiles stop there (``MAX_PROFILE_BATCH``), and
shape inference at a fixed batch costs memory that grows with it."""


def check_graph(model: onnx.ModelProto | str | Path, trt_version: int = 10, max_batch: int = 32) -> list[Finding]:
    """Everything TensorRT ``trt_version``.x will demand of ``model``, fatal findings first.

    Args:
        model: an ONNX model or the path of one (it is not modified).
        trt_version: TensorRT major version, 10 or 11.
        max_batch: the optimisation profile's largest batch; shapes that grow with the batch
            (TopK's K, NMS boxes, tensor volumes) are judged at this batch.

    Raises:
        ModelError: the file is missing or not an ONNX model.
        ConfigError: an unknown TensorRT version or a batch below 1.
    """
    table = TABLES.get(trt_version)
    if table is None:
        raise ConfigError(f"unknown TensorRT version {trt_version!r}; check-trt knows {', '.join(map(str, TABLES))}")
    if not 1 <= int(max_batch) <= MAX_CHECK_BATCH:
        raise ConfigError(f"--max-batch must be 1 to {MAX_CHECK_BATCH} (the largest engine batch profile ctmask "
                          f"builds), got {max_batch}")
    proto, path = _load(model)
    if not proto.graph.node and not proto.opset_import:
        raise ModelError("not an ONNX model (no graph)", path)
    return _run(GraphFacts(proto, int(max_batch)), table)
