"""The rules ``ctmask check-trt`` applies to each node of a graph (numbers as in
:mod:`ctmask.trt.check`): operator support, element types, TopK, NonMaxSuppression, RoiAlign
and Q/DQ, over the facts of :class:`ctmask.trt.fold.GraphFacts`.

Imports only onnx, numpy, the standard library and :mod:`ctmask.core` (no torch, no
onnxruntime, no TensorRT).
"""

from __future__ import annotations

import numpy as np
import onnx

from ctmask.core.errors import FATAL, INFO, WARNING, Finding
from ctmask.trt.fold import DEFAULT_DOMAINS, GraphFacts, attrs, subgraphs
from ctmask.trt.support import (
    CLAMPED_SENTINELS,
    FLOAT_TYPES,
    INT32_MAX,
    NMS_TOPK_BOX_LIMIT,
    NMS_TOPK_BOX_LIMIT_SM53_62,
    ONNX_TYPE_NAMES,
    QUANTIZED_TYPES,
    SAME_TYPE_INPUTS,
    TOPK_MAX_K,
    NodeFacts,
    OpSupport,
    TrtTable,
)


class Checks:
    """The findings of one graph for one TensorRT major, as the rules add them."""

    def __init__(self, g: GraphFacts, table: TrtTable):
        self.g = g
        self.table = table
        self.findings: list[Finding] = []
        self.typing = (f"TensorRT {table.version} networks are always strongly typed" if table.always_strongly_typed
                       else "ctmask builds TensorRT 10 networks strongly typed (STRONGLY_TYPED)")

    def add(self, severity: str, node: str, op: str, message: str) -> None:
        self.findings.append(Finding(message, severity, node=node, op=op))

    def add_node(self, severity: str, node: onnx.NodeProto, message: str) -> None:
        self.add(severity, self.g.label(node), node.op_type, message)


# 1, 4-9 per node
def check_node(c: Checks, node: onnx.NodeProto) -> None:
    g = c.g
    spec = _op_support(c, node)
    for sub in subgraphs(node):
        _subgraph(c, node, sub)
    if spec is None:
        return
    op = node.op_type
    if op not in ("QuantizeLinear", "DequantizeLinear"):
        _types(c, node, spec)
    if spec.check is not None:
        facts = NodeFacts(op, attrs(node), tuple(node.input), g.opset or 0,
                          lambda i: g.value(node.input[i]) if i < len(node.input) else None,
                          lambda i: g.rank(node.input[i]) if i < len(node.input) and node.input[i] else None,
                          tuple(g.used(o) for o in node.output))
        for severity, message in spec.check(facts):
            c.add_node(severity, node, message)
    _same_types(c, node)
    extra_check = {"TopK": _topk, "NonMaxSuppression": _nms, "RoiAlign": _roi_align,
                   "QuantizeLinear": _qdq, "DequantizeLinear": _qdq}.get(op)
    if extra_check is not None:
        extra_check(c, node)


def _subgraph(c: Checks, owner: onnx.NodeProto, graph: onnx.GraphProto) -> None:
    """Nodes of an If / Loop / Scan body: operator support only (their types are not inferred here)."""
    for node in graph.node:
        _op_support(c, node)
        for sub in subgraphs(node):
            _subgraph(c, node, sub)
    c.add_node(WARNING, owner, f"subgraph {graph.name!r} ({len(graph.node)} nodes): checked for operator "
                               "support only, not for types, limits or Q/DQ (ctmask graphs have no "
                               "subgraphs)")


def _op_support(c: Checks, node: onnx.NodeProto) -> OpSupport | None:
    """The node's row of the matrix when the parser imports it; otherwise a finding and None."""
    g, t = c.g, c.table
    op = node.op_type
    if node.domain not in DEFAULT_DOMAINS:
        if any(f.name == op and f.domain == node.domain for f in g.proto.functions):
            c.add_node(INFO, node, f"model-local function {node.domain}.{op}: the parser imports its body")
        elif op in t.plugins:
            c.add_node(WARNING, node, f"custom op of domain {node.domain!r}, resolved as TensorRT plugin "
                                      f"{op!r}: the builder must load libnvinfer_plugin")
        else:
            c.add_node(FATAL, node, f"domain {node.domain!r} is not ONNX's default domain and {op!r} is no "
                                    f"TensorRT {t.version}.x plugin")
        return None
    spec = t.ops.get(op)
    if spec is None:
        if op in t.plugins:
            c.add_node(WARNING, node, f"{op!r} is no ONNX operator of the matrix; the parser resolves it as a "
                                      "TensorRT plugin: the builder must load libnvinfer_plugin")
        else:
            c.add_node(FATAL, node, f"{op!r} is not in TensorRT {t.version}.x's ONNX operator matrix")
        return None
    if not spec.supported:
        extra = f" ({spec.restriction})" if spec.restriction else ""
        c.add_node(FATAL, node, f"TensorRT {t.version}.x's ONNX parser does not support {op}{extra}")
        return None
    return spec


def _types(c: Checks, node: onnx.NodeProto, spec: OpSupport) -> None:
    g = c.g
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
        c.add_node(WARNING, node, f"DOUBLE tensor(s) {', '.join(double)}: TensorRT casts DOUBLE down to FP32 "
                                  "(clamping to +-FLT_MAX)")
    for name, where, tn in bad:
        allowed = ", ".join(sorted(spec.types))
        if tn in QUANTIZED_TYPES:
            why = (f"{tn} is a quantized type in TensorRT: in a strongly typed network only DequantizeLinear "
                   f"consumes it ({c.typing})")
        elif tn == "UINT8":
            why = "UINT8 is supported only as a network input or output type"
        else:
            why = f"{node.op_type} takes {allowed}"
        c.add_node(FATAL, node, f"{where} '{name}' is {tn}: {why}")


def _same_types(c: Checks, node: onnx.NodeProto) -> None:
    """[OP-EW]: inputs one TensorRT layer takes as one type T1; no implicit casts when strongly typed."""
    ports = SAME_TYPE_INPUTS.get(node.op_type)
    if ports is None:
        return
    idx = range(len(node.input)) if isinstance(ports, str) else [i for i in ports if i < len(node.input)]
    typed = [(node.input[i], c.g.type_name(node.input[i])) for i in idx if node.input[i]]
    if any(tn is None for _, tn in typed) or len({tn for _, tn in typed}) < 2:
        return
    listing = ", ".join(f"'{n}' {tn}" for n, tn in typed)
    floats = {tn for _, tn in typed} & FLOAT_TYPES
    kind = "float types" if len(floats) > 1 else "element types"
    c.add_node(FATAL, node, f"inputs mix {kind} ({listing}): the TensorRT layer takes one type and "
                            f"{c.typing}, so nothing casts them: add a Cast in the graph")


# 4. TopK
def _topk(c: Checks, node: onnx.NodeProto) -> None:
    g = c.g
    a = attrs(node)
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
            c.add_node(WARNING, node, f"K ('{name}') is {where}: TensorRT takes K as a shape tensor and "
                                      f"refuses K > {TOPK_MAX_K} when it is known; make K a constant")
            return
        flat = np.asarray(v).reshape(-1)
        if flat.size != 1:
            c.add_node(FATAL, node, f"K ('{name}') holds {flat.size} values; TopK takes exactly one")
            return
        k = int(flat[0])
        how = ("an initializer" if name in g.inits else "a Constant node" if g.is_constant(name)
               else f"folded from shapes at batch {g.max_batch}")
    dims = g.fixed_dims(node.input[0])
    axis = int(a.get("axis", -1))
    d = dims[axis % len(dims)] if dims else None
    if k < 1:
        c.add_node(FATAL, node, f"K = {k} ({how}): TopK needs K >= 1")
    elif k > TOPK_MAX_K:
        c.add_node(FATAL, node, f"K = {k} ({how}) exceeds TensorRT's TopK limit of {TOPK_MAX_K}")
    elif k == TOPK_MAX_K:
        c.add_node(WARNING, node, f"K = {k} ({how}) is TensorRT's TopK limit: the 10.x matrix says K must be "
                                  f"less than {TOPK_MAX_K}, the layer API up to {TOPK_MAX_K}")
    elif isinstance(d, int) and k > d:
        c.add_node(FATAL, node, f"K = {k} ({how}) exceeds the reduced dimension ({d})")
    else:
        size = f" of {d}" if isinstance(d, int) else ""
        c.add_node(INFO, node, f"K = {k}{size} ({how}): within TensorRT's TopK limit of {TOPK_MAX_K}")


# 5. NonMaxSuppression
def _nms(c: Checks, node: onnx.NodeProto) -> None:
    g = c.g
    boxes = g.fixed_dims(node.input[0])
    scores = g.fixed_dims(node.input[1]) if len(node.input) > 1 else None
    n = boxes[1] if boxes is not None and len(boxes) == 3 else None
    per = scores[1] if scores is not None and len(scores) == 3 else None
    if not isinstance(n, int):
        c.add_node(WARNING, node, f"boxes per NMS call (dimension 1 of '{node.input[0]}') cannot be resolved "
                                  f"statically: TensorRT considers at most {NMS_TOPK_BOX_LIMIT} per batch item")
    else:
        classes = per if isinstance(per, int) else 1
        cand = n * classes
        what = f"{n} boxes x {classes} class(es) = {cand} candidates per batch item"
        if cand > NMS_TOPK_BOX_LIMIT:
            c.add_node(FATAL, node, f"{what} exceed INMSLayer's TopK box limit of {NMS_TOPK_BOX_LIMIT}: "
                                    f"TensorRT drops all but the {NMS_TOPK_BOX_LIMIT} best-scoring before "
                                    "NMS, so its selection can differ from ONNX's")
        elif cand > NMS_TOPK_BOX_LIMIT_SM53_62:
            c.add_node(WARNING, node, f"{what}: within the limit of {NMS_TOPK_BOX_LIMIT}, above the "
                                      f"{NMS_TOPK_BOX_LIMIT_SM53_62} of SM 5.3 / 6.2 devices (Jetson Nano, TX2)")
        else:
            c.add_node(INFO, node, f"{what}: within INMSLayer's TopK box limit ({NMS_TOPK_BOX_LIMIT}; "
                                   f"{NMS_TOPK_BOX_LIMIT_SM53_62} on SM 5.3 / 6.2)")
    if len(node.input) > 2 and node.input[2]:
        v = g.value(node.input[2])
        if v is not None and v.size == 1:
            m = int(np.asarray(v).reshape(-1)[0])
            if m > INT32_MAX:
                c.add_node(INFO, node, f"max_output_boxes_per_class = {m} (INT64): "
                                       f"{CLAMPED_SENTINELS[('NonMaxSuppression', 2)]}")
            elif m < 0:
                c.add_node(FATAL, node, f"max_output_boxes_per_class = {m} is negative")


# 6. RoiAlign
def _roi_align(c: Checks, node: onnx.NodeProto) -> None:
    c.add_node(WARNING, node, "imported as the ROIAlign_TRT plugin (version 2) of libnvinfer_plugin: call "
                              "trt.init_libnvinfer_plugins before parsing and before deserialising the engine "
                              "(batch_indices become INT32)")


# 8. Q/DQ
def _qdq(c: Checks, node: onnx.NodeProto) -> None:
    g = c.g
    a = attrs(node)
    is_q = node.op_type == "QuantizeLinear"
    x = node.input[0]
    xt = g.type_name(x)
    zp_name = node.input[2] if len(node.input) > 2 else ""
    zp_type = g.type_name(zp_name) if zp_name else None
    if is_q:
        if xt is not None and xt not in ("FP32", "FP16", "BF16"):
            c.add_node(FATAL, node, f"input '{x}' is {xt}: TensorRT quantizes FP32 / FP16 / BF16 only")
        out_t = zp_type or (ONNX_TYPE_NAMES.get(int(a["output_dtype"])) if a.get("output_dtype") else None)
        if out_t is None:
            c.add_node(FATAL, node, "no zero-point and no output_dtype: ONNX quantizes to UINT8, TensorRT to "
                                    "INT8 (another range): give an INT8 zero-point of 0")
        else:
            _quant_type(c, node, out_t, "quantizes to")
    else:
        if xt == "INT32":
            c.add_node(FATAL, node, f"input '{x}' is INT32 (a quantized bias): TensorRT dequantizes only "
                                    "INT8 / FP8 / INT4 (the parser stops with 'only activation types allowed "
                                    "as input'): keep biases float (onnxruntime quantize_static "
                                    "extra_options QuantizeBias=False)")
        elif xt is not None:
            _quant_type(c, node, xt, f"input '{x}' is")
    _scale(c, node, a)
    if zp_name:
        zp = g.value(zp_name)
        if zp is None:
            c.add_node(WARNING, node, f"zero-point '{zp_name}' is not a build-time constant: TensorRT needs it "
                                      "to be all zeros")
        elif np.any(np.asarray(zp) != 0):
            vals = sorted({int(z) for z in np.asarray(zp).reshape(-1)})
            shown = ", ".join(map(str, vals[:4])) + (", ..." if len(vals) > 4 else "")
            c.add_node(FATAL, node, f"zero-point '{zp_name}' is not 0 ({shown}): TensorRT supports only "
                                    "symmetric quantization (zero-point 0)")


def _quant_type(c: Checks, node: onnx.NodeProto, t: str, what: str) -> None:
    if t == "UINT8":
        c.add_node(FATAL, node, f"{what} UINT8 (asymmetric uint8 activations: onnxruntime's CPU form): "
                                "TensorRT quantizes to INT8 only and its parser swaps UINT8 for INT8, another "
                                "range: export with --int8-target tensorrt")
    elif t not in ("INT8", "FP8", "INT4", "FP4"):
        c.add_node(FATAL, node, f"{what} {t}: TensorRT's quantized types are INT8, FP8, INT4 (FP4)")


def _scale(c: Checks, node: onnx.NodeProto, a: dict) -> None:
    g = c.g
    name = node.input[1] if len(node.input) > 1 else ""
    scale = g.value(name)
    if scale is None:
        c.add_node(FATAL, node, f"scale '{name}' is not a build-time constant: TensorRT's Q/DQ scale must be "
                                "a constant scalar or 1-D tensor")
        return
    s = np.asarray(scale, np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        c.add_node(FATAL, node, f"scale '{name}' has non-positive or non-finite coefficients (min {s.min():g}): "
                                "TensorRT needs every coefficient > 0")
    if s.size <= 1:
        return
    x = node.input[0]
    dims = g.fixed_dims(x) or g.shapes.get(x)
    if s.ndim > 1 and (dims is None or s.ndim != len(dims)):
        c.add_node(FATAL, node, f"scale '{name}' has rank {s.ndim}: TensorRT takes a scalar or 1-D scale "
                                "(or a blocked scale of the input's rank)")
        return
    if "axis" not in a:
        c.add_node(FATAL, node, "per-axis scale without an axis attribute: ONNX means axis 1, TensorRT's "
                                "importer takes axis 0: set axis explicitly")
        return
    if node.op_type == "QuantizeLinear" and not g.is_constant(x):
        c.add_node(FATAL, node, f"per-axis quantization of activation '{x}': TensorRT quantizes activations "
                                "per tensor (per-axis scales are for weights)")
    if s.ndim == 1 and dims is not None:
        axis = int(a["axis"]) % len(dims)
        if isinstance(dims[axis], int) and dims[axis] != s.size:
            c.add_node(FATAL, node, f"{s.size} scale coefficients for {dims[axis]} channels on axis {axis}")
