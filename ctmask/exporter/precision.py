"""Reduced-precision graphs from the exported FP32 graph: FP16 with FP32 islands, INT8 Q/DQ.

TensorRT's strongly typed networks take precision from the ONNX file itself, so the
precision of every node is decided here, on the CPU, and proven by parity before an
engine is built. Nodes are grouped into *blocks* by the PyTorch module that produced
them (the exporter records each node's module path in its ``name_scopes`` metadata);
a block is the unit that runs in reduced precision or stays an FP32 island.

The conversions are done by maintained libraries: onnxconverter-common's float16 pass
(with every node of an FP32 island in its block list) and onnxruntime's Q/DQ quantizer
(fed ranges from :mod:`ctmask.calibration`).
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import helper

from ctmask.core.errors import PrecisionError

PRECISIONS = ("fp32", "fp16", "int8")
INT8_TARGETS = ("tensorrt", "cpu")


BLOCKS: dict[str, tuple[str, str]] = {
    # block: (module path prefix in the exporter's name scopes, what it is)
    "backbone.body": ("model.ranker.backbone.body", "ResNet stem and stages (most of the FLOPs)"),
    "backbone.fpn": ("model.ranker.backbone.fpn", "feature pyramid: lateral and output convolutions, upsampling"),
    "rpn_head": ("model.ranker.rpn_head", "RPN convolutions: objectness logits and anchor deltas"),
    "box_head": ("model.ranker.box_head", "two-layer MLP on the RoIAlign features"),
    "box_predictor": ("model.ranker.box_predictor", "class logits and box deltas of each proposal"),
    "ranking": ("model.ranker", "input normalisation, anchors, proposal decoding, NMS, RoIAlign, score softmax, "
                                "box encoding, top-N ranking"),
    "classifier": ("model.classifier", "S: the MLP on the N x 5 ranked RoIs"),
}
"""The blocks of a ctmask graph, most specific prefix first within the ranker. Nodes outside
them (the output softmax, batch-size arithmetic) form the block ``other``, always FP32."""

OTHER = "other"


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, list) else []
    return []


def node_block(node: onnx.NodeProto) -> str:
    """The block of ``node`` (a key of :data:`BLOCKS`, or ``"other"``)."""
    scopes = _scopes(node)
    for name, (prefix, _) in BLOCKS.items():
        if any(s == prefix or s.startswith(prefix + ".") for s in scopes):
            return name
    return OTHER


def graph_blocks(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names of every block present in ``proto`` (blocks in :data:`BLOCKS` order)."""
    out: dict[str, list[str]] = {name: [] for name in [*BLOCKS, OTHER]}
    for node in proto.graph.node:
        out[node_block(node)].append(node.name)
    return {k: v for k, v in out.items() if v}


def name_all_nodes(proto: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (block lists and Q/DQ exclusion go by name)."""
    seen = Counter(n.name for n in proto.graph.node if n.name)
    for i, node in enumerate(proto.graph.node):
        if not node.name or seen[node.name] > 1:
            node.name = f"{node.op_type}_{i}_ctmask"


def _detach_outputs(proto: onnx.ModelProto) -> None:
    """Graph outputs that other nodes also read are produced through an ``Identity``.

    onnxconverter-common's float16 pass mistypes a graph output that is read inside the
    graph (``rois`` feeds S, ``logits`` feeds the softmax): it leaves a Cast whose declared
    type onnxruntime refuses. Splitting the two uses avoids that.
    """
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    consumed = {i for n in graph.node for i in n.input}
    for name in outputs & consumed:
        inner = f"{name}__ctmask_inner"
        for node in graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        graph.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}__ctmask_output"))


def working_copy(proto: onnx.ModelProto, fp32_blocks: set[str]) -> onnx.ModelProto:
    """A copy of ``proto`` with every node named, after checking the block names."""
    unknown = set(fp32_blocks) - set(BLOCKS)
    if unknown:
        raise PrecisionError(f"unknown block(s) {sorted(unknown)}; blocks are {', '.join(BLOCKS)}")
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    name_all_nodes(work)
    return work


def _private_weights(proto: onnx.ModelProto, nodes: set[str]) -> None:
    """Give each of ``nodes`` its own copy of every initializer it shares with another node.

    The RPN head's convolutions run once per FPN level on one set of weights; reducing one
    of them alone must not change (FP16: nor mistype) the weights the others read.
    """
    inits = {t.name: t for t in proto.graph.initializer}
    readers = Counter(i for n in proto.graph.node for i in n.input if i in inits)
    for node in proto.graph.node:
        if node.name not in nodes:
            continue
        for k, name in enumerate(node.input):
            if name in inits and readers[name] > 1:
                private = f"{name}__ctmask_{node.name}"
                if private not in inits:  # a node reading one weight twice gets one copy
                    inits[private] = copy = onnx.TensorProto()
                    copy.CopyFrom(inits[name])
                    copy.name = private
                    proto.graph.initializer.append(copy)
                node.input[k] = private


def _split_shared_initializers(proto: onnx.ModelProto, fp32_nodes: set[str]) -> None:
    """Give the reduced nodes one copy of every initializer that FP32 nodes read too.

    The exporter shares identical constants between unrelated nodes (the scalar 4.0 of the
    FPN level mapper, an FP32 island, and of a head's delta scaling); the float16 pass keeps
    an initializer FP32 when any block-listed node reads it, and the FP16 node reading it
    then mixes types (onnxruntime refuses the graph).
    """
    inits = {t.name: t for t in proto.graph.initializer}
    fp32_reads = {i for n in proto.graph.node if n.name in fp32_nodes for i in n.input if i in inits}
    copies: dict[str, str] = {}
    for node in proto.graph.node:
        if node.name in fp32_nodes:
            continue
        for k, name in enumerate(node.input):
            if name in fp32_reads:
                if name not in copies:
                    copies[name] = f"{name}__ctmask_reduced"
                    copy = onnx.TensorProto()
                    copy.CopyFrom(inits[name])
                    copy.name = copies[name]
                    proto.graph.initializer.append(copy)
                node.input[k] = copies[name]


def _float_for_others(proto: onnx.ModelProto, nodes: set[str]) -> None:
    """After Q/DQ insertion: nodes other than ``nodes`` read the float original of every
    activation that ``nodes`` take as input (the quantizer rewires all of a tensor's readers).

    The reduced nodes' own outputs stay quantized for their readers: that rounding is part of
    running the node in INT8. Q/DQ pairs left without a reader are removed.
    """
    graph = proto.graph
    inputs = {i for n in graph.node if n.name in nodes for i in n.input}
    original = {dq: tensor for dq, (tensor, _) in _quantized_activations(graph).items() if dq in inputs}
    _read_float(graph, original, lambda node: node.name in nodes)


def convert_fp16(proto: onnx.ModelProto, fp32_blocks: set[str], only_nodes: set[str] | None = None) -> onnx.ModelProto:
    """The FP16 graph of an FP32 ctmask graph, with the nodes of ``fp32_blocks`` kept FP32.

    Inputs and outputs stay float32 (``keep_io_types``); ``other`` is always FP32, and so
    are the operators onnxconverter-common never converts (NMS, TopK, RoIAlign, Resize ...).

    Args:
        proto: FP32 graph (not modified).
        fp32_blocks: blocks (keys of :data:`BLOCKS`) that stay FP32 islands.
        only_nodes: if given, only these nodes (names as :func:`name_all_nodes` gives them)
            are converted, with their own copies of weights they share; every other node
            stays FP32 (the per-node sensitivity measurement).

    Raises:
        PrecisionError: an unknown block name.
    """
    from onnxconverter_common import float16

    work = working_copy(proto, fp32_blocks)
    del work.graph.value_info[:]  # stale FP32 types; shape inference redoes them
    _detach_outputs(work)
    if only_nodes is not None:
        _private_weights(work, only_nodes)
    keep = [n.name for n in work.graph.node if node_block(n) in set(fp32_blocks) | {OTHER}
            or (only_nodes is not None and n.name not in only_nodes)]
    _split_shared_initializers(work, set(keep))
    with warnings.catch_warnings():
        # "the float32 number 1e-09 will be truncated to 1e-07": tiny weights clamp to FP16's range.
        warnings.simplefilter("ignore", UserWarning)
        out = float16.convert_float_to_float16(work, keep_io_types=True, node_block_list=keep)
    float_outputs(out)
    remove_cast_round_trips(out)
    return out


def float_outputs(proto: onnx.ModelProto) -> None:
    """Make every float16 graph output float32 again.

    Even with ``keep_io_types`` the converter declares an output float16 and appends a
    ``Cast(to=float16)`` when the output's producer is a block-listed node; the cast is
    turned into a ``Cast(to=float)`` (an identity when its input is already float).
    """
    producer = {o: n for n in proto.graph.node for o in n.output}
    for out in proto.graph.output:
        if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producer.get(out.name)
        if node is None or node.op_type != "Cast":
            raise PrecisionError(f"float16 graph output {out.name!r} is not produced by a Cast")
        for attr in node.attribute:
            if attr.name == "to":
                attr.i = onnx.TensorProto.FLOAT
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def remove_cast_round_trips(proto: onnx.ModelProto) -> int:
    """Short-circuit ``Cast(to=float)`` of a ``Cast(to=float16)``; return how many were removed.

    onnxconverter-common types every intermediate tensor float16, also between two nodes
    of its block list, and so puts a float -> float16 -> float round trip between every
    pair of FP32 nodes: an "FP32 island" would still round each of its activations to
    FP16 (measured: with the whole detector listed, as many class calls changed as with
    none), and a graph output read by an FP16 node would come out FP16-rounded. Every
    reader of such a round trip takes the original FP32 tensor instead; a float16 cast
    left with no reader is dropped. Casts where an FP16 node reads an FP32 tensor stay.
    """
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}

    def cast_to(node: onnx.NodeProto | None) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    rename: dict[str, str] = {}
    for node in graph.node:
        if cast_to(node) == onnx.TensorProto.FLOAT and node.output[0] not in outputs:
            up = producer.get(node.input[0])
            if cast_to(up) == onnx.TensorProto.FLOAT16:
                rename[node.output[0]] = up.input[0]
    kept = [n for n in graph.node if n.output[0] not in rename or n.op_type != "Cast"]
    for node in kept:
        node.input[:] = [rename.get(i, i) for i in node.input]
    read = {i for n in kept for i in n.input} | outputs
    kept = [n for n in kept if not (cast_to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in read)]
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    live = {o for n in kept for o in n.output}
    keep_vi = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    return removed


def fp16_initializers(proto: onnx.ModelProto) -> tuple[int, int]:
    """(float16 weight elements, float32 weight elements) of ``proto``'s initializers."""
    import numpy as np

    half = single = 0
    for init in proto.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        if init.data_type == onnx.TensorProto.FLOAT16:
            half += n
        elif init.data_type == onnx.TensorProto.FLOAT:
            single += n
    return half, single


def islands_metadata(islands: dict[str, str]) -> str:
    """The ``ctmask.fp32_islands`` value: block -> why it stayed FP32."""
    return json.dumps(islands, sort_keys=True)


@dataclass(frozen=True)
class BlockInfo:
    name: str
    nodes: int
    ops: dict[str, int]
    description: str

    def to_dict(self) -> dict:
        return {"block": self.name, "nodes": self.nodes, "ops": self.ops, "description": self.description}


def describe_blocks(proto: onnx.ModelProto) -> list[BlockInfo]:
    """Node counts and operator mix of each block of ``proto``."""
    by_name = {n.name: n for n in proto.graph.node}
    out = []
    for name, nodes in graph_blocks(proto).items():
        ops = Counter(by_name[n].op_type for n in nodes if n in by_name)
        desc = BLOCKS[name][1] if name in BLOCKS else "output softmax and batch-size arithmetic (always FP32)"
        out.append(BlockInfo(name, len(nodes), dict(ops.most_common()), desc))
    return out


def uncovered_tensors(proto: onnx.ModelProto, excluded: set[str], op_types: list[str], covered: set[str]) -> list[str]:
    """Float activations read or written by the quantized nodes that have no range."""
    inits = {t.name for t in proto.graph.initializer}
    need = []
    for node in proto.graph.node:
        if node.op_type in op_types and node.name not in excluded:
            need += [t for t in (*node.input[:1], *node.output[:1]) if t and t not in inits]
    return sorted(set(need) - covered)


@contextlib.contextmanager
def _as_precision_error():
    """onnxruntime's quantizer raises ValueError / RuntimeError on what it cannot do."""
    try:
        yield
    except (ValueError, RuntimeError, KeyError) as exc:
        raise PrecisionError(f"onnxruntime's quantizer failed: {str(exc).splitlines()[0][:300]}") from None


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer logs advice ("consider pre-processing") on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def cpu_grid(ranges):
    """The ranges a ``cpu`` (uint8) form quantizes with: for the scales of a QAT fine-tune
    (``options["qat"]``: every detector range is ``[-amax, amax]``, trained on the signed
    symmetric grid ``amax / 127 * [-128, 127]``), each symmetric range becomes
    ``[-amax * 128 / 127, amax]``, for which onnxruntime's uint8 quantizer picks scale
    ``amax / 127`` and zero-point 128: the same grid as the fine-tune's and the tensorrt form's.
    (``[-amax, amax]`` as is would give scale ``2 amax / 255`` and zero-point 128, a grid
    0.4% finer than the one the detector was trained on.) Other ranges are returned as they are.
    """
    import dataclasses

    if not ranges.options.get("qat"):
        return ranges
    shifted = {name: ((-hi * 128.0 / 127.0, hi) if hi > 0 and lo == -hi else (lo, hi))
               for name, (lo, hi) in ranges.ranges.items()}
    return dataclasses.replace(ranges, ranges=shifted)


def quantize_int8(proto: onnx.ModelProto, ranges, target: str, fp32_blocks: set[str],
                  only_nodes: set[str] | None = None) -> onnx.ModelProto:
    """The Q/DQ INT8 graph of an FP32 ctmask graph, from calibrated ranges.

    onnxruntime's static quantizer (``quantize_static``, QDQ format) does the work: weights
    int8, symmetric, per output channel; activations per tensor from ``ranges`` (a
    :class:`ctmask.calibration.ranges.RangesFile`, handed over through onnxruntime's own
    calibration cache so no calibration runs here). Only the operators the ranges were
    measured for (:data:`~ctmask.calibration.collect.QUANTIZED_OPS`) outside ``fp32_blocks``
    are quantized.

    Args:
        proto: FP32 graph (not modified); the ranges must have been measured on it.
        ranges: its ranges file.
        target: ``tensorrt`` (int8 activations, symmetric, zero-point 0, float biases: what
            TensorRT's explicit quantization requires) or ``cpu`` (uint8 asymmetric
            activations and int32 biases, the form onnxruntime's x86 kernels run fastest).
        fp32_blocks: blocks kept FP32 (their nodes are excluded).
        only_nodes: if given, only these nodes (names as :func:`name_all_nodes` gives them)
            are quantized (the per-node sensitivity measurement): their inputs, weights (own
            copies where shared) and outputs; every other reader of their inputs keeps FP32.

    Raises:
        PrecisionError: an unknown target or block.
        RangesError: ranges that miss a quantized tensor or name an unknown :func:`residual_form`.
    """
    from ctmask.calibration.collect import QUANTIZED_OPS

    if target not in INT8_TARGETS:
        raise PrecisionError(f"unknown INT8 target {target!r}; expected one of {', '.join(INT8_TARGETS)}")
    work = working_copy(proto, fp32_blocks)
    if only_nodes is not None:
        _private_weights(work, only_nodes)
    exclude = [n.name for n in work.graph.node if node_block(n) in set(fp32_blocks) | {OTHER}
               or (only_nodes is not None and n.name not in only_nodes)]
    op_types = list(ranges.options.get("op_types", QUANTIZED_OPS))
    missing = uncovered_tensors(work, set(exclude), op_types, set(ranges.ranges))
    if missing:
        from ctmask.core.errors import RangesError

        raise RangesError(f"the ranges do not cover {len(missing)} tensor(s) that INT8 quantizes (e.g. "
                          f"{missing[0]!r}): they were measured for other operators or another graph",
                          hint="calibrate this graph again (`ctmask calibrate`)")
    residual, tensorrt = residual_form(ranges), target == "tensorrt"
    out = _quantize_static(work, ranges if tensorrt else cpu_grid(ranges), op_types, exclude, tensorrt)
    if only_nodes is not None:
        _float_for_others(out, only_nodes)
    else:
        float_for_unquantized_readers(out, set(op_types), set(exclude), residual)
    return out


def _quantize_static(work: onnx.ModelProto, ranges, op_types: list[str], exclude: list[str],
                     tensorrt: bool) -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` (QDQ) of ``work`` at ``ranges``, through its calibration cache."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from ctmask.calibration.ranges import ort_method

    with tempfile.TemporaryDirectory(prefix="ctmask-int8-") as tmp:
        src, dst, cache = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
        onnx.save(work, str(src))
        save_tensors_data(ranges.tensors_data(), cache)
        with warnings.catch_warnings(), _quiet_root_logger(), _as_precision_error():
            warnings.simplefilter("ignore")
            quantize_static(
                str(src), str(dst), None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=ort_method(ranges.method),
                calibration_cache_path=str(cache),
                # TensorRT dequantizes int8 only: onnxruntime's int32 biases behind a
                # DequantizeLinear stop its ONNX parser (check-trt finds them), so the
                # tensorrt form keeps biases float, as TensorRT fuses them itself.
                extra_options={"ActivationSymmetric": tensorrt, "WeightSymmetric": True,
                               "QuantizeBias": not tensorrt},
            )
        return onnx.load(str(dst))


def residual_form(ranges) -> str:
    """What the residual and top-down paths of an INT8 graph read (``float`` or ``int8``, see
    :data:`ctmask.calibration.ranges.RESIDUAL_FORMS`): the ranges file's ``residual`` option (the
    form a QAT detector was fine-tuned with, from ``ctmask qat-ranges``), else ``float``.

    Raises:
        RangesError: an unknown form.
    """
    from ctmask.calibration.ranges import RESIDUAL_FORMS

    form = ranges.options.get("residual", "float")
    if form not in RESIDUAL_FORMS:
        from ctmask.core.errors import RangesError

        raise RangesError(f"the ranges name an unknown residual form {json.dumps(form)}; expected "
                          f"{' or '.join(RESIDUAL_FORMS)}")
    return form


def float_for_unquantized_readers(proto: onnx.ModelProto, op_types: set[str], excluded: set[str],
                                  residual: str = "float") -> int:
    """After Q/DQ insertion: an activation quantized only as a quantized node's *input* is
    read in float by every node that is not quantized (a residual Add, the FPN's upsampling
    of its top-down sum, Shape); return how many inputs were rewired.

    onnxruntime's quantizer rewires all readers of a quantized tensor to its
    DequantizeLinear, so the residual path of a ResNet block and the FPN's top-down path
    carried the rounding of the next convolution's input quantizer. The model the QAT
    fine-tune trains (ModelOpt: an ``input_quantizer`` quantizes that module's input only)
    does not, and neither does the FP32 model: measured on a QAT detector (4 slices), 2.8%
    of the backbone's, FPN's and RPN head's quantized activations then differed from the
    fine-tuned model by more than one int8 step (22 steps at most); 0.5% (6 at most) after
    this rewiring. A quantized node's *output* stays
    quantized for all its readers (ModelOpt's ``output_quantizer``). Q/DQ pairs left
    without a reader are removed. ``excluded``: the nodes left FP32 (``--fp32-blocks``), which
    read float too.

    ``residual="int8"`` (a detector fine-tuned with ``ctmask qat --residual int8``): only the
    excluded nodes read float; every other reader keeps the DequantizeLinear output (on the
    presets: the residual Add and the upsampling, as the fine-tune's model reads them,
    :func:`ctmask.training.qat.quantize_shared_reads`; parity refuses a graph where another
    kind of node does). The per-node sensitivity graphs (``only_nodes``) read float either way.
    """
    graph = proto.graph
    produced = {o: n for n in graph.node for o in n.output}

    def quantized(node: onnx.NodeProto) -> bool:
        return node.op_type in op_types and node.name not in excluded and any(
            produced.get(i) is not None and produced[i].op_type == "DequantizeLinear" for i in node.input)

    def keeps_quantized(node: onnx.NodeProto) -> bool:
        return quantized(node) or (residual == "int8" and node.name not in excluded)

    original = {dq: tensor for dq, (tensor, source) in _quantized_activations(graph).items()
                if source is None or not quantized(source)}
    return _read_float(graph, original, keeps_quantized)


def _quantized_activations(graph: onnx.GraphProto) -> dict[str, tuple[str, onnx.NodeProto | None]]:
    """DequantizeLinear output of each quantized activation -> (the float tensor its
    QuantizeLinear reads, the node producing that tensor or None)."""
    produced = {o: n for n in graph.node for o in n.output}
    out = {}
    for dq in graph.node:
        q = produced.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            out[dq.output[0]] = (q.input[0], produced.get(q.input[0]))
    return out


def _read_float(graph: onnx.GraphProto, original: dict[str, str], keeps_quantized) -> int:
    """Every node but Q/DQ and those ``keeps_quantized`` accepts reads ``original[t]`` in
    place of each DequantizeLinear output ``t`` it reads; Q/DQ pairs left without a reader are
    removed. Returns how many inputs were rewired."""
    rewired = 0
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or keeps_quantized(node):
            continue
        for k, name in enumerate(node.input):
            if name in original:
                node.input[k] = original[name]
                rewired += 1
    _remove_dead_qdq(graph)
    return rewired


def _remove_dead_qdq(graph: onnx.GraphProto) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)


def qdq_summary(proto: onnx.ModelProto) -> dict:
    """Q/DQ facts of a graph: counts, element types and zero-points of activations and weights."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    act_types, weight_types, act_zp, weight_zp = Counter(), Counter(), set(), set()
    for n in dq:
        zp = value(n.input[2]) if len(n.input) > 2 else None
        is_weight = n.input[0] in inits
        dtype = str(zp.dtype) if zp is not None else str(value(n.input[0]).dtype) if is_weight else "?"
        (weight_types if is_weight else act_types)[dtype] += 1
        if zp is not None:
            (weight_zp if is_weight else act_zp).update(np.unique(zp).tolist())
    return {"quantize_linear": len(q), "dequantize_linear": len(dq),
            "activation_types": dict(act_types), "weight_types": dict(weight_types),
            "activation_zero_points": sorted(int(v) for v in act_zp)[:8],
            "activation_zero_points_all_zero": act_zp <= {0},
            "weight_zero_points": sorted(int(v) for v in weight_zp)[:8]}
