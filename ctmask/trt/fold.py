"""The constant folder of ``ctmask check-trt``: the facts about an ONNX graph that the checks
share (types and shapes by ONNX shape inference, once with the batch symbolic and once at the
optimisation profile's ``max_batch``; producers and consumers), and the values known before the
build: initializers, Constant nodes, Shape of tensors whose dimensions are static at that batch,
and integer arithmetic on them (:class:`GraphFacts`).

Imports only onnx, numpy, the standard library and :mod:`ctmask.core` (no torch, no
onnxruntime, no TensorRT).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ctmask.core.spec import INPUT
from ctmask.trt.support import ONNX_TYPE_NAMES

FOLD_MAX_ELEMENTS = 1 << 16
"""Largest tensor the static evaluator materialises (K, shapes and scales are tiny)."""

DEFAULT_DOMAINS = ("", "ai.onnx")


# ---- reading the graph ---------------------------------------------------------------------


def numel(dims) -> int:
    return int(math.prod(int(d) for d in dims))


def dims_of(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    t = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)


def _light_model(proto: onnx.ModelProto, batch: int | None) -> onnx.ModelProto:
    """``proto`` for shape inference: large initializers become typed inputs (no data), the
    exporter's value_info is dropped (inferred afresh), and with ``batch`` the symbolic
    dimension 0 of ``images`` becomes that number."""
    g = proto.graph
    big = {t.name for t in g.initializer if numel(t.dims) > FOLD_MAX_ELEMENTS}
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


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    a = attrs(node)
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    for key, dtype in (("value_int", np.int64), ("value_ints", np.int64), ("value_float", np.float32),
                       ("value_floats", np.float32)):
        if key in a:
            return np.array(a[key], dtype)
    return None


class GraphFacts:
    """The facts the checks share: types, shapes (symbolic batch and at ``max_batch``),
    producers and consumers, and the values that are known before the build."""

    def __init__(self, proto: onnx.ModelProto, max_batch: int):
        self.proto = proto
        self.graph = proto.graph
        self.max_batch = max_batch
        self.opset = next((o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS), None)
        self.inits = {t.name: t for t in self.graph.initializer}
        self.inputs = [i for i in self.graph.input if i.name not in self.inits]
        self.output_names = {o.name for o in self.graph.output}
        self.producer, self.consumers = _links(self.graph)
        self.types: dict[str, int] = {t.name: t.data_type for t in self.graph.initializer}
        self.shapes: dict[str, tuple] = {t.name: tuple(int(d) for d in t.dims) for t in self.graph.initializer}
        self.fixed: dict[str, tuple] = dict(self.shapes)
        self.inference_error = _read_shapes(self)
        self.values: dict[str, np.ndarray] = {}
        self.shape_only: dict[str, bool] = {}
        _fold(self)

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
        if t is not None and numel(t.dims) <= FOLD_MAX_ELEMENTS:
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


def _links(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[tuple[onnx.NodeProto, int]]]]:
    """Each tensor's producer, and its consumers with the input index they read it at."""
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for o in node.output:
            if o:
                producer[o] = node
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, i))
    return producer, consumers


def _record(g: GraphFacts, vi: onnx.ValueInfoProto, shapes: dict[str, tuple]) -> None:
    if vi.name in g.inits or not vi.type.HasField("tensor_type"):
        return
    if vi.type.tensor_type.elem_type:
        g.types[vi.name] = vi.type.tensor_type.elem_type
    dims = dims_of(vi)
    if dims is not None:
        shapes[vi.name] = dims


def _read_shapes(g: GraphFacts) -> str | None:
    """Types and shapes as declared and inferred (``g.shapes``), and at ``max_batch`` (``g.fixed``);
    returns why shape inference failed, or None."""
    graph = g.graph
    inferred, error = _infer(g.proto, None)
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        _record(g, vi, g.shapes)
    if inferred is not None:
        for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
            _record(g, vi, g.shapes)
    fixed, _ = _infer(g.proto, g.max_batch) if error is None else (None, None)
    if fixed is not None:
        for vi in [*fixed.graph.input, *fixed.graph.output, *fixed.graph.value_info]:
            if vi.name not in g.inits:
                dims = dims_of(vi)
                if dims is not None:
                    g.fixed[vi.name] = dims
    return error


# -- static evaluation


def _fold(g: GraphFacts) -> None:
    """One pass in graph (topological) order: every node of a foldable op whose inputs are
    known gets its outputs computed; ``shape_only`` marks tensors computed from shapes and
    constants only (TensorRT shape tensors), whether or not their value is known here."""
    for name in g.inits:
        g.shape_only[name] = True
    for node in g.graph.node:
        op = node.op_type
        ins = [i for i in node.input if i]
        if op == "Constant":
            only = True
        elif op in ("Shape", "Size"):
            only = True
        elif op in _DATA_DEPENDENT:
            only = False
        else:
            only = bool(ins) and all(g.shape_only.get(i, False) for i in ins)
        for o in node.output:
            g.shape_only[o] = only
        if op not in _FOLDERS:
            continue
        try:
            outs = _FOLDERS[op](g, node, attrs(node))
        except Exception:  # a shape we cannot evaluate: leave it unknown
            outs = None
        if outs is None:
            continue
        for o, v in zip(node.output, outs):
            if o and v is not None and np.asarray(v).size <= FOLD_MAX_ELEMENTS:
                g.values[o] = np.asarray(v)


_DATA_DEPENDENT = frozenset({"NonZero", "NonMaxSuppression", "TopK", "Unique", "RandomNormal", "RandomUniform",
                             "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})


def _all_known(values: list) -> bool:
    return all(v is not None for v in values)


def _fold_shape(g: GraphFacts, node: onnx.NodeProto, a: dict) -> list | None:
    dims = g.fixed_dims(node.input[0])
    if dims is None:
        return None
    part = dims[slice(a.get("start", 0), a.get("end"))]
    if not all(isinstance(d, int) for d in part):
        return None
    return [np.array(part, np.int64)]


def _fold_size(g: GraphFacts, node: onnx.NodeProto, a: dict) -> list | None:
    dims = g.fixed_dims(node.input[0])
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return [np.array(numel(dims), np.int64)]


def _fold_simple(fn):
    """A folder for an op whose every present input must be known."""

    def fold(g: GraphFacts, node: onnx.NodeProto, a: dict) -> list | None:
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
        x = np.expanddims_of(x, ax)
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

