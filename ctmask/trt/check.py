"""``ctmask check-trt``: what TensorRT's ONNX parser and builder will demand of a graph,
decided without a GPU and without TensorRT.

The rules and where each comes from are in :mod:`ctmask.trt.support` (operator matrix,
limits, restriction checks). This module reads the graph (types and shapes by ONNX shape
inference, once with the batch symbolic and once with it set to the optimisation profile's
``max_batch``), folds what can be known before the build (initializers, Constant nodes,
Shape of tensors whose dimensions are static at that batch, and integer arithmetic on
them), and reports one :class:`Finding` per violation, naming the ONNX node:

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

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ctmask.core.errors import FATAL, INFO, SEVERITIES, WARNING, ConfigError, Finding, ModelError
from ctmask.core.graphs import load_proto
from ctmask.core.spec import INPUT
from ctmask.trt.support import (
    CLAMPED_SENTINELS,
    FLOAT_TYPES,
    INT32_MAX,
    INT64_NARROWED,
    MAX_VOLUME,
    NMS_TOPK_BOX_LIMIT,
    NMS_TOPK_BOX_LIMIT_SM53_62,
    ONNX_TYPE_NAMES,
    QUANTIZED_TYPES,
    SAME_TYPE_INPUTS,
    TABLES,
    TOPK_MAX_K,
    NodeFacts,
    OpSupport,
    TrtTable,
)

__all__ = ["FATAL", "INFO", "SEVERITIES", "WARNING", "Finding", "check_graph", "fatal", "format_findings"]

GRAPH = "<graph>"
"""Node name of findings about the whole graph (opset, INT64 summary)."""

_FOLD_MAX_ELEMENTS = 1 << 16
"""Largest tensor the static evaluator materialises (K, shapes and scales are tiny)."""

_DEFAULT_DOMAINS = ("", "ai.onnx")


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


# ---- reading the graph ---------------------------------------------------------------------


def _numel(dims) -> int:
    return int(math.prod(int(d) for d in dims))


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    t = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)


def _light_model(proto: onnx.ModelProto, batch: int | None) -> onnx.ModelProto:
    """``proto`` for shape inference: large initializers become typed inputs (no data), the
    exporter's value_info is dropped (inferred afresh), and with ``batch`` the symbolic
    dimension 0 of ``images`` becomes that number."""
    g = proto.graph
    big = {t.name for t in g.initializer if _numel(t.dims) > _FOLD_MAX_ELEMENTS}
    m = onnx.ModelProto()
    m.ir_version = proto.ir_version
    m.opset_import.extend(proto.opset_import)
    m.functions.extend(proto.functions)
    lg = m.graph
    lg.name = g.name
    lg.node.extend(g.node)
    for vi in g.input:
        if vi.name in big:
            continue
        new = lg.input.add()
        new.CopyFrom(vi)
        dims = new.type.tensor_type.shape.dim
        if batch is not None and vi.name == INPUT and len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    for t in g.initializer:
        if t.name in big:
            lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            lg.initializer.append(t)
    lg.output.extend(g.output)
    return m


def _infer(proto: onnx.ModelProto, batch: int | None) -> tuple[onnx.ModelProto | None, str | None]:
    try:
        light = _light_model(proto, batch)
        return shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True), None
    except Exception as exc:  # onnx raises InferenceError, ValidationError, RuntimeError ...
        return None, f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    a = _attrs(node)
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    for key, dtype in (("value_int", np.int64), ("value_ints", np.int64), ("value_float", np.float32),
                       ("value_floats", np.float32)):
        if key in a:
            return np.array(a[key], dtype)
    return None


class _Graph:
    """The facts the checks share: types, shapes (symbolic batch and at ``max_batch``),
    producers and consumers, and the values that are known before the build."""

    def __init__(self, proto: onnx.ModelProto, max_batch: int):
        self.proto = proto
        self.graph = proto.graph
        self.max_batch = max_batch
        self.opset = next((o.version for o in proto.opset_import if o.domain in _DEFAULT_DOMAINS), None)
        self.inits = {t.name: t for t in self.graph.initializer}
        self.inputs = [i for i in self.graph.input if i.name not in self.inits]
        self.output_names = {o.name for o in self.graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.graph.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
        self.types: dict[str, int] = {t.name: t.data_type for t in self.graph.initializer}
        self.shapes: dict[str, tuple] = {t.name: tuple(int(d) for d in t.dims) for t in self.graph.initializer}
        self.fixed: dict[str, tuple] = dict(self.shapes)
        inferred, self.inference_error = _infer(proto, None)
        for vi in [*self.graph.input, *self.graph.output, *self.graph.value_info]:
            self._record(vi, self.shapes)
        if inferred is not None:
            for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
                self._record(vi, self.shapes)
        fixed, _ = _infer(proto, max_batch) if self.inference_error is None else (None, None)
        if fixed is not None:
            for vi in [*fixed.graph.input, *fixed.graph.output, *fixed.graph.value_info]:
                if vi.name not in self.inits:
                    dims = _dims(vi)
                    if dims is not None:
                        self.fixed[vi.name] = dims
        self.values: dict[str, np.ndarray] = {}
        self.shape_only: dict[str, bool] = {}
        self._fold()

    def _record(self, vi: onnx.ValueInfoProto, shapes: dict[str, tuple]) -> None:
        if vi.name in self.inits or not vi.type.HasField("tensor_type"):
            return
        if vi.type.tensor_type.elem_type:
            self.types[vi.name] = vi.type.tensor_type.elem_type
        dims = _dims(vi)
        if dims is not None:
            shapes[vi.name] = dims

    # -- naming and lookups

    @staticmethod
    def label(node: onnx.NodeProto) -> str:
        return node.name or f"<{node.op_type}:{node.output[0] if node.output else '?'}>"

    def type_name(self, name: str) -> str | None:
        t = self.types.get(name)
        return ONNX_TYPE_NAMES.get(t, f"type {t}") if t else None

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name, self.fixed.get(name))
        return None if s is None else len(s)

    def fixed_dims(self, name: str) -> tuple | None:
        return self.fixed.get(name)

    def value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is known before the build (at ``max_batch``)."""
        if not name:
            return None
        if name in self.values:
            return self.values[name]
        t = self.inits.get(name)
        if t is not None and _numel(t.dims) <= _FOLD_MAX_ELEMENTS:
            try:
                v = numpy_helper.to_array(t)
            except Exception:  # external data that was not loaded
                return None
            self.values[name] = v
            return v
        return None

    def is_constant(self, name: str) -> bool:
        """An initializer or a Constant node's output (a build-time constant as written)."""
        return name in self.inits or (name in self.producer and self.producer[name].op_type == "Constant")

    def used(self, name: str) -> bool:
        return bool(name) and (name in self.output_names or name in self.consumers)

    # -- static evaluation

    def _fold(self) -> None:
        """One pass in graph (topological) order: every node of a foldable op whose inputs are
        known gets its outputs computed; ``shape_only`` marks tensors computed from shapes and
        constants only (TensorRT shape tensors), whether or not their value is known here."""
        for name in self.inits:
            self.shape_only[name] = True
        for node in self.graph.node:
            op = node.op_type
            ins = [i for i in node.input if i]
            if op == "Constant":
                only = True
            elif op in ("Shape", "Size"):
                only = True
            elif op in _DATA_DEPENDENT:
                only = False
            else:
                only = bool(ins) and all(self.shape_only.get(i, False) for i in ins)
            for o in node.output:
                self.shape_only[o] = only
            if op not in _FOLDERS:
                continue
            try:
                outs = _FOLDERS[op](self, node, _attrs(node))
            except Exception:  # a shape we cannot evaluate: leave it unknown
                outs = None
            if outs is None:
                continue
            for o, v in zip(node.output, outs):
                if o and v is not None and np.asarray(v).size <= _FOLD_MAX_ELEMENTS:
                    self.values[o] = np.asarray(v)


_DATA_DEPENDENT = frozenset({"NonZero", "NonMaxSuppression", "TopK", "Unique", "RandomNormal", "RandomUniform",
                             "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})


def _ins(g: _Graph, node: onnx.NodeProto, n: int | None = None) -> list[np.ndarray | None]:
    names = list(node.input) if n is None else list(node.input[:n])
    return [g.value(i) if i else None for i in names]


def _all_known(values: list) -> bool:
    return all(v is not None for v in values)


def _fold_shape(g: _Graph, node: onnx.NodeProto, a: dict) -> list | None:
    dims = g.fixed_dims(node.input[0])
    if dims is None:
        return None
    part = dims[slice(a.get("start", 0), a.get("end"))]
    if not all(isinstance(d, int) for d in part):
        return None
    return [np.array(part, np.int64)]


def _fold_size(g: _Graph, node: onnx.NodeProto, a: dict) -> list | None:
    dims = g.fixed_dims(node.input[0])
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return [np.array(_numel(dims), np.int64)]


def _fold_simple(fn):
    """A folder for an op whose every present input must be known."""

    def fold(g: _Graph, node: onnx.NodeProto, a: dict) -> list | None:
        values = [g.value(i) if i else None for i in node.input]
        present = [v for i, v in zip(node.input, values) if i]
        if not _all_known(present):
            return None
        return [fn(values, a, g.opset or 0)]

    return fold


def _axes_of(values: list, a: dict, index: int = 1) -> list[int] | None:
    if len(values) > index and values[index] is not None:
        return [int(x) for x in np.asarray(values[index]).reshape(-1)]
    if "axes" in a:
        return [int(x) for x in a["axes"]]
    return None


def _unsqueeze(v, a, opset):
    axes = _axes_of(v, a)
    x = v[0]
    rank = x.ndim + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = np.expand_dims(x, ax)
    return x


def _squeeze(v, a, opset):
    axes = _axes_of(v, a)
    x = v[0]
    return np.squeeze(x, axis=tuple(ax % x.ndim for ax in axes)) if axes else np.squeeze(x)


def _reshape(v, a, opset):
    x, shape = v[0], [int(s) for s in v[1].reshape(-1)]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _slice(v, a, opset):
    x = v[0]
    starts, ends = v[1].reshape(-1), v[2].reshape(-1)
    axes = v[3].reshape(-1) if len(v) > 3 and v[3] is not None else np.arange(len(starts))
    steps = v[4].reshape(-1) if len(v) > 4 and v[4] is not None else np.ones(len(starts), np.int64)
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[int(ax) % x.ndim] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def _div(v, a, opset):
    x, y = v
    if np.issubdtype(x.dtype, np.integer):
        return np.trunc(x / y).astype(x.dtype)
    return (x / y).astype(x.dtype)


def _reduce(fn):
    def fold(v, a, opset):
        x = v[0]
        axes = _axes_of(v, a)
        if axes is None or (len(axes) == 0 and not a.get("noop_with_empty_axes", 0)):
            axes = list(range(x.ndim))
        if not axes:
            return x
        return fn(x, axis=tuple(ax % x.ndim for ax in axes), keepdims=bool(a.get("keepdims", 1)))

    return fold


def _cast(v, a, opset):
    return v[0].astype(helper.tensor_dtype_to_np_dtype(int(a["to"])))


def _constant_of_shape(v, a, opset):
    fill = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    return np.full([int(s) for s in v[0].reshape(-1)], fill.reshape(-1)[0], fill.dtype)


def _range(v, a, opset):
    start, limit, delta = (np.asarray(x).reshape(-1)[0] for x in v)
    return np.arange(start, limit, delta, dtype=np.asarray(v[0]).dtype)


def _expand(v, a, opset):
    shape = tuple(int(s) for s in v[1].reshape(-1))
    return np.broadcast_to(v[0], np.broadcast_shapes(v[0].shape, shape)).copy()


def _concat(v, a, opset):
    return np.concatenate(v, axis=int(a["axis"]))


def _gather(v, a, opset):
    return np.take(v[0], v[1].astype(np.int64), axis=int(a.get("axis", 0)))


_FOLDERS = {
    "Shape": _fold_shape,
    "Size": _fold_size,
    "Constant": lambda g, node, a: [_constant_value(node)],
    "Identity": _fold_simple(lambda v, a, o: v[0]),
    "Cast": _fold_simple(_cast),
    "Reshape": _fold_simple(_reshape),
    "Unsqueeze": _fold_simple(_unsqueeze),
    "Squeeze": _fold_simple(_squeeze),
    "Concat": _fold_simple(_concat),
    "Gather": _fold_simple(_gather),
    "Slice": _fold_simple(_slice),
    "Add": _fold_simple(lambda v, a, o: v[0] + v[1]),
    "Sub": _fold_simple(lambda v, a, o: v[0] - v[1]),
    "Mul": _fold_simple(lambda v, a, o: v[0] * v[1]),
    "Div": _fold_simple(_div),
    "Min": _fold_simple(lambda v, a, o: np.minimum.reduce(np.broadcast_arrays(*v))),
    "Max": _fold_simple(lambda v, a, o: np.maximum.reduce(np.broadcast_arrays(*v))),
    "Neg": _fold_simple(lambda v, a, o: -v[0]),
    "Abs": _fold_simple(lambda v, a, o: np.abs(v[0])),
    "Floor": _fold_simple(lambda v, a, o: np.floor(v[0])),
    "Ceil": _fold_simple(lambda v, a, o: np.ceil(v[0])),
    "Equal": _fold_simple(lambda v, a, o: np.equal(v[0], v[1])),
    "Less": _fold_simple(lambda v, a, o: np.less(v[0], v[1])),
    "Greater": _fold_simple(lambda v, a, o: np.greater(v[0], v[1])),
    "Not": _fold_simple(lambda v, a, o: np.logical_not(v[0])),
    "Where": _fold_simple(lambda v, a, o: np.where(v[0], v[1], v[2])),
    "ReduceProd": _fold_simple(_reduce(np.prod)),
    "ReduceSum": _fold_simple(_reduce(np.sum)),
    "ReduceMin": _fold_simple(_reduce(np.min)),
    "ReduceMax": _fold_simple(_reduce(np.max)),
    "ConstantOfShape": _fold_simple(_constant_of_shape),
    "Range": _fold_simple(_range),
    "Expand": _fold_simple(_expand),
    "Transpose": _fold_simple(lambda v, a, o: np.transpose(v[0], a.get("perm"))),
    "Tile": _fold_simple(lambda v, a, o: np.tile(v[0], [int(r) for r in v[1].reshape(-1)])),
}


# ---- the checks ----------------------------------------------------------------------------


class _Checker:
    """Runs every rule over one graph for one TensorRT major and collects the findings."""

    def __init__(self, g: _Graph, table: TrtTable):
        self.g = g
        self.table = table
        self.findings: list[Finding] = []
        self.typing = (f"TensorRT {table.version} networks are always strongly typed" if table.always_strongly_typed
                       else "ctmask builds TensorRT 10 networks strongly typed (STRONGLY_TYPED)")

    def add(self, severity: str, node: str, op: str, message: str) -> None:
        self.findings.append(Finding(message, severity, node=node, op=op))

    def add_node(self, severity: str, node: onnx.NodeProto, message: str) -> None:
        self.add(severity, self.g.label(node), node.op_type, message)

    def run(self) -> list[Finding]:
        g = self.g
        if g.inference_error:
            self.add(WARNING, GRAPH, "shape inference", f"ONNX shape inference failed ({g.inference_error}): types "
                                                        "and shapes are the declared ones only, checks are partial")
        self.opset()
        self.io()
        for node in g.graph.node:
            self.node(node)
        self.uint8_internal()
        self.int64()
        self.volumes()
        order = {s: i for i, s in enumerate(SEVERITIES)}
        return sorted(self.findings, key=lambda f: order[f.severity])

    # 2. opset

    def opset(self) -> None:
        t, opset = self.table, self.g.opset
        if opset is None:
            self.add(FATAL, GRAPH, "opset", "the model imports no default-domain (ai.onnx) opset")
        elif opset in t.opset_notes:  # only some releases of the major parse it
            severity, why = t.opset_notes[opset]
            self.add(severity, GRAPH, "opset", why)
        elif t.opset_min <= opset <= t.opset_max:
            self.add(INFO, GRAPH, "opset", f"opset {opset}: within TensorRT {t.version}.x's {t.opset_min}.."
                                           f"{t.opset_max}")
        else:
            self.add(FATAL, GRAPH, "opset", f"opset {opset} is outside TensorRT {t.version}.x's range {t.opset_min}.."
                                            f"{t.opset_max}: re-export with `ctmask export --opset 18`")

    # 3. dynamic dimensions

    def io(self) -> None:
        g = self.g
        for vi in g.inputs:
            dims = _dims(vi)
            if dims is None:
                self.add(FATAL, vi.name, "graph input", "no declared shape: TensorRT needs the rank and every "
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
                self.add(FATAL, vi.name, "graph input", f"{'; '.join(bad)}: only dimension 0 of '{INPUT}' (the batch) "
                                                        "may be dynamic (one optimisation profile over the batch)")
            t = g.type_name(vi.name)
            if t == "DOUBLE":
                self.add(WARNING, vi.name, "graph input", "DOUBLE input: TensorRT casts DOUBLE down to FP32")
            elif t is not None and t not in ("FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"):
                self.add(FATAL, vi.name, "graph input", f"{t} is not a TensorRT network input type")
        for vi in g.graph.output:
            declared = _dims(vi) or ()
            inferred = g.shapes.get(vi.name, declared)
            for i, d in enumerate(declared):
                if i == 0 or isinstance(d, int):
                    continue
                got = inferred[i] if i < len(inferred) else None
                if not isinstance(got, int):
                    self.add(WARNING, vi.name, "graph output",
                             f"dimension {i} is declared {d!r} and shape inference cannot resolve it "
                             f"({got!r}): only the batch should be dynamic")

    # 1, 4-9 per node

    def node(self, node: onnx.NodeProto) -> None:
        g = self.g
        spec = self.op_support(node)
        for sub in _subgraphs(node):
            self.subgraph(node, sub)
        if spec is None:
            return
        op = node.op_type
        if op not in ("QuantizeLinear", "DequantizeLinear"):
            self.types(node, spec)
        if spec.check is not None:
            facts = NodeFacts(op, _attrs(node), tuple(node.input), g.opset or 0,
                              lambda i: g.value(node.input[i]) if i < len(node.input) else None,
                              lambda i: g.rank(node.input[i]) if i < len(node.input) and node.input[i] else None,
                              tuple(g.used(o) for o in node.output))
            for severity, message in spec.check(facts):
                self.add_node(severity, node, message)
        self.same_types(node)
        extra_check = {"TopK": self.topk, "NonMaxSuppression": self.nms, "RoiAlign": self.roi_align,
                       "QuantizeLinear": self.qdq, "DequantizeLinear": self.qdq}.get(op)
        if extra_check is not None:
            extra_check(node)

    def subgraph(self, owner: onnx.NodeProto, graph: onnx.GraphProto) -> None:
        """Nodes of an If / Loop / Scan body: operator support only (their types are not inferred here)."""
        for node in graph.node:
            self.op_support(node)
            for sub in _subgraphs(node):
                self.subgraph(node, sub)
        self.add_node(WARNING, owner, f"subgraph {graph.name!r} ({len(graph.node)} nodes): checked for operator "
                                      "support only, not for types, limits or Q/DQ (ctmask graphs have no "
                                      "subgraphs)")

    def op_support(self, node: onnx.NodeProto) -> OpSupport | None:
        """The node's row of the matrix when the parser imports it; otherwise a finding and None."""
        g, t = self.g, self.table
        op = node.op_type
        if node.domain not in _DEFAULT_DOMAINS:
            if any(f.name == op and f.domain == node.domain for f in g.proto.functions):
                self.add_node(INFO, node, f"model-local function {node.domain}.{op}: the parser imports its body")
            elif op in t.plugins:
                self.add_node(WARNING, node, f"custom op of domain {node.domain!r}, resolved as TensorRT plugin "
                                             f"{op!r}: the builder must load libnvinfer_plugin")
            else:
                self.add_node(FATAL, node, f"domain {node.domain!r} is not ONNX's default domain and {op!r} is no "
                                           f"TensorRT {t.version}.x plugin")
            return None
        spec = t.ops.get(op)
        if spec is None:
            if op in t.plugins:
                self.add_node(WARNING, node, f"{op!r} is no ONNX operator of the matrix; the parser resolves it as a "
                                             "TensorRT plugin: the builder must load libnvinfer_plugin")
            else:
                self.add_node(FATAL, node, f"{op!r} is not in TensorRT {t.version}.x's ONNX operator matrix")
            return None
        if not spec.supported:
            extra = f" ({spec.restriction})" if spec.restriction else ""
            self.add_node(FATAL, node, f"TensorRT {t.version}.x's ONNX parser does not support {op}{extra}")
            return None
        return spec

    def types(self, node: onnx.NodeProto, spec: OpSupport) -> None:
        g = self.g
        if spec.ports == "out":
            names = [(node.output[0], "output")] if node.output else []
        elif isinstance(spec.ports, str):  # ALL
            names = [(n, f"input {i}") for i, n in enumerate(node.input) if n]
        else:
            names = [(node.input[i], f"input {i}") for i in spec.ports if i < len(node.input) and node.input[i]]
        bad, double = [], []
        for name, where in names:
            tn = g.type_name(name)
            if tn is None or tn in spec.types:
                continue
            if tn == "DOUBLE":
                double.append(name)
            else:
                bad.append((name, where, tn))
        if double:
            self.add_node(WARNING, node, f"DOUBLE tensor(s) {', '.join(double)}: TensorRT casts DOUBLE down to FP32 "
                                         "(clamping to +-FLT_MAX)")
        for name, where, tn in bad:
            allowed = ", ".join(sorted(spec.types))
            if tn in QUANTIZED_TYPES:
                why = (f"{tn} is a quantized type in TensorRT: in a strongly typed network only DequantizeLinear "
                       f"consumes it ({self.typing})")
            elif tn == "UINT8":
                why = "UINT8 is supported only as a network input or output type"
            else:
                why = f"{node.op_type} takes {allowed}"
            self.add_node(FATAL, node, f"{where} '{name}' is {tn}: {why}")

    def same_types(self, node: onnx.NodeProto) -> None:
        """[OP-EW]: inputs one TensorRT layer takes as one type T1; no implicit casts when strongly typed."""
        ports = SAME_TYPE_INPUTS.get(node.op_type)
        if ports is None:
            return
        idx = range(len(node.input)) if isinstance(ports, str) else [i for i in ports if i < len(node.input)]
        typed = [(node.input[i], self.g.type_name(node.input[i])) for i in idx if node.input[i]]
        if any(tn is None for _, tn in typed) or len({tn for _, tn in typed}) < 2:
            return
        listing = ", ".join(f"'{n}' {tn}" for n, tn in typed)
        floats = {tn for _, tn in typed} & FLOAT_TYPES
        kind = "float types" if len(floats) > 1 else "element types"
        self.add_node(FATAL, node, f"inputs mix {kind} ({listing}): the TensorRT layer takes one type and "
                                   f"{self.typing}, so nothing casts them: add a Cast in the graph")

    # 4. TopK

    def topk(self, node: onnx.NodeProto) -> None:
        g = self.g
        a = _attrs(node)
        if (g.opset or 0) < 10:
            if "k" not in a:
                return  # a TopK-10+ node under an older opset: the opset finding says it
            k, how = int(a["k"]), "the k attribute"
        else:
            name = node.input[1] if len(node.input) > 1 else ""
            v = g.value(name)
            if v is None:
                where = ("computed from shapes (a TensorRT shape tensor) that this check cannot evaluate"
                         if g.shape_only.get(name) else "computed from data at run time")
                self.add_node(WARNING, node, f"K ('{name}') is {where}: TensorRT takes K as a shape tensor and "
                                             f"refuses K > {TOPK_MAX_K} when it is known; make K a constant")
                return
            flat = np.asarray(v).reshape(-1)
            if flat.size != 1:
                self.add_node(FATAL, node, f"K ('{name}') holds {flat.size} values; TopK takes exactly one")
                return
            k = int(flat[0])
            how = ("an initializer" if name in g.inits else "a Constant node" if g.is_constant(name)
                   else f"folded from shapes at batch {g.max_batch}")
        dims = g.fixed_dims(node.input[0])
        axis = int(a.get("axis", -1))
        d = dims[axis % len(dims)] if dims else None
        if k < 1:
            self.add_node(FATAL, node, f"K = {k} ({how}): TopK needs K >= 1")
        elif k > TOPK_MAX_K:
            self.add_node(FATAL, node, f"K = {k} ({how}) exceeds TensorRT's TopK limit of {TOPK_MAX_K}")
        elif k == TOPK_MAX_K:
            self.add_node(WARNING, node, f"K = {k} ({how}) is TensorRT's TopK limit: the 10.x matrix says K must be "
                                         f"less than {TOPK_MAX_K}, the layer API up to {TOPK_MAX_K}")
        elif isinstance(d, int) and k > d:
            self.add_node(FATAL, node, f"K = {k} ({how}) exceeds the reduced dimension ({d})")
        else:
            size = f" of {d}" if isinstance(d, int) else ""
            self.add_node(INFO, node, f"K = {k}{size} ({how}): within TensorRT's TopK limit of {TOPK_MAX_K}")

    # 5. NonMaxSuppression

    def nms(self, node: onnx.NodeProto) -> None:
        g = self.g
        boxes = g.fixed_dims(node.input[0])
        scores = g.fixed_dims(node.input[1]) if len(node.input) > 1 else None
        n = boxes[1] if boxes is not None and len(boxes) == 3 else None
        c = scores[1] if scores is not None and len(scores) == 3 else None
        if not isinstance(n, int):
            self.add_node(WARNING, node, f"boxes per NMS call (dimension 1 of '{node.input[0]}') cannot be resolved "
                                         f"statically: TensorRT considers at most {NMS_TOPK_BOX_LIMIT} per batch item")
        else:
            classes = c if isinstance(c, int) else 1
            cand = n * classes
            what = f"{n} boxes x {classes} class(es) = {cand} candidates per batch item"
            if cand > NMS_TOPK_BOX_LIMIT:
                self.add_node(FATAL, node, f"{what} exceed INMSLayer's TopK box limit of {NMS_TOPK_BOX_LIMIT}: "
                                           f"TensorRT drops all but the {NMS_TOPK_BOX_LIMIT} best-scoring before "
                                           "NMS, so its selection can differ from ONNX's")
            elif cand > NMS_TOPK_BOX_LIMIT_SM53_62:
                self.add_node(WARNING, node, f"{what}: within the limit of {NMS_TOPK_BOX_LIMIT}, above the "
                                             f"{NMS_TOPK_BOX_LIMIT_SM53_62} of SM 5.3 / 6.2 devices (Jetson Nano, TX2)")
            else:
                self.add_node(INFO, node, f"{what}: within INMSLayer's TopK box limit ({NMS_TOPK_BOX_LIMIT}; "
                                          f"{NMS_TOPK_BOX_LIMIT_SM53_62} on SM 5.3 / 6.2)")
        if len(node.input) > 2 and node.input[2]:
            v = g.value(node.input[2])
            if v is not None and v.size == 1:
                m = int(np.asarray(v).reshape(-1)[0])
                if m > INT32_MAX:
                    self.add_node(INFO, node, f"max_output_boxes_per_class = {m} (INT64): "
                                              f"{CLAMPED_SENTINELS[('NonMaxSuppression', 2)]}")
                elif m < 0:
                    self.add_node(FATAL, node, f"max_output_boxes_per_class = {m} is negative")

    # 6. RoiAlign

    def roi_align(self, node: onnx.NodeProto) -> None:
        self.add_node(WARNING, node, "imported as the ROIAlign_TRT plugin (version 2) of libnvinfer_plugin: call "
                                     "trt.init_libnvinfer_plugins before parsing and before deserialising the engine "
                                     "(batch_indices become INT32)")

    # 8. Q/DQ

    def qdq(self, node: onnx.NodeProto) -> None:
        g = self.g
        a = _attrs(node)
        is_q = node.op_type == "QuantizeLinear"
        x = node.input[0]
        xt = g.type_name(x)
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp_type = g.type_name(zp_name) if zp_name else None
        if is_q:
            if xt is not None and xt not in ("FP32", "FP16", "BF16"):
                self.add_node(FATAL, node, f"input '{x}' is {xt}: TensorRT quantizes FP32 / FP16 / BF16 only")
            out_t = zp_type or (ONNX_TYPE_NAMES.get(int(a["output_dtype"])) if a.get("output_dtype") else None)
            if out_t is None:
                self.add_node(FATAL, node, "no zero-point and no output_dtype: ONNX quantizes to UINT8, TensorRT to "
                                           "INT8 (another range): give an INT8 zero-point of 0")
            else:
                self._quant_type(node, out_t, "quantizes to")
        else:
            if xt == "INT32":
                self.add_node(FATAL, node, f"input '{x}' is INT32 (a quantized bias): TensorRT dequantizes only "
                                           "INT8 / FP8 / INT4 (the parser stops with 'only activation types allowed "
                                           "as input'): keep biases float (onnxruntime quantize_static "
                                           "extra_options QuantizeBias=False)")
            elif xt is not None:
                self._quant_type(node, xt, f"input '{x}' is")
        self._scale(node, a)
        if zp_name:
            zp = g.value(zp_name)
            if zp is None:
                self.add_node(WARNING, node, f"zero-point '{zp_name}' is not a build-time constant: TensorRT needs it "
                                             "to be all zeros")
            elif np.any(np.asarray(zp) != 0):
                vals = sorted({int(z) for z in np.asarray(zp).reshape(-1)})
                shown = ", ".join(map(str, vals[:4])) + (", ..." if len(vals) > 4 else "")
                self.add_node(FATAL, node, f"zero-point '{zp_name}' is not 0 ({shown}): TensorRT supports only "
                                           "symmetric quantization (zero-point 0)")

    def _quant_type(self, node: onnx.NodeProto, t: str, what: str) -> None:
        if t == "UINT8":
            self.add_node(FATAL, node, f"{what} UINT8 (asymmetric uint8 activations: onnxruntime's CPU form): "
                                       "TensorRT quantizes to INT8 only and its parser swaps UINT8 for INT8, another "
                                       "range: export with --int8-target tensorrt")
        elif t not in ("INT8", "FP8", "INT4", "FP4"):
            self.add_node(FATAL, node, f"{what} {t}: TensorRT's quantized types are INT8, FP8, INT4 (FP4)")

    def _scale(self, node: onnx.NodeProto, a: dict) -> None:
        g = self.g
        name = node.input[1] if len(node.input) > 1 else ""
        scale = g.value(name)
        if scale is None:
            self.add_node(FATAL, node, f"scale '{name}' is not a build-time constant: TensorRT's Q/DQ scale must be "
                                       "a constant scalar or 1-D tensor")
            return
        s = np.asarray(scale, np.float64)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            self.add_node(FATAL, node, f"scale '{name}' has non-positive or non-finite coefficients (min {s.min():g}): "
                                       "TensorRT needs every coefficient > 0")
        if s.size <= 1:
            return
        x = node.input[0]
        dims = g.fixed_dims(x) or g.shapes.get(x)
        if s.ndim > 1 and (dims is None or s.ndim != len(dims)):
            self.add_node(FATAL, node, f"scale '{name}' has rank {s.ndim}: TensorRT takes a scalar or 1-D scale "
                                       "(or a blocked scale of the input's rank)")
            return
        if "axis" not in a:
            self.add_node(FATAL, node, "per-axis scale without an axis attribute: ONNX means axis 1, TensorRT's "
                                       "importer takes axis 0: set axis explicitly")
            return
        if node.op_type == "QuantizeLinear" and not g.is_constant(x):
            self.add_node(FATAL, node, f"per-axis quantization of activation '{x}': TensorRT quantizes activations "
                                       "per tensor (per-axis scales are for weights)")
        if s.ndim == 1 and dims is not None:
            axis = int(a["axis"]) % len(dims)
            if isinstance(dims[axis], int) and dims[axis] != s.size:
                self.add_node(FATAL, node, f"{s.size} scale coefficients for {dims[axis]} channels on axis {axis}")

    # internal UINT8

    def uint8_internal(self) -> None:
        g = self.g
        for node in g.graph.node:
            if node.op_type == "QuantizeLinear":
                continue
            for o in node.output:
                if o and g.type_name(o) == "UINT8" and o not in g.output_names:
                    self.add_node(FATAL, node, f"output '{o}' is UINT8: TensorRT supports UINT8 only as a network "
                                               "input or output type")

    # 7. INT64

    def int64(self) -> None:
        g = self.g
        n64 = sum(1 for t in g.types.values() if t == onnx.TensorProto.INT64)
        narrowed = []
        for node in g.graph.node:
            ports = INT64_NARROWED.get(node.op_type) if node.domain in _DEFAULT_DOMAINS else None
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
                    self.add_node(FATAL, node, f"INT64 constant '{node.input[i]}' holds values outside INT32 "
                                               f"(max {int(v.max())}, min {int(v.min())}) and the importer {how}")
        if not n64:
            return
        shown = "; ".join(narrowed[:6]) + (f"; and {len(narrowed) - 6} more" if len(narrowed) > 6 else "")
        where = f": {shown}" if narrowed else ""
        self.add(INFO, GRAPH, "INT64", f"{n64} INT64 tensors: TensorRT {self.table.version} keeps INT64 natively (the "
                                       f"ONNX parser stopped casting INT64 down in 9.0); the importer narrows to INT32 "
                                       f"at {len(narrowed)} input(s){where}")

    # 10. volumes

    def volumes(self) -> None:
        g = self.g
        seen = set()
        for node in g.graph.node:
            for o in node.output:
                dims = g.fixed_dims(o)
                if not o or o in seen or dims is None or not all(isinstance(d, int) for d in dims):
                    continue
                seen.add(o)
                n = _numel(dims)
                if n > MAX_VOLUME:
                    severity = FATAL if node.op_type == "TopK" or any(
                        c.op_type == "TopK" for c, _ in g.consumers.get(o, [])) else WARNING
                    self.add_node(severity, node, f"'{o}' has {n:,} elements at batch {g.max_batch} (> 2^31 - 1): "
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
    return _Checker(_Graph(proto, int(max_batch)), table).run()
