"""What an INT8 (Q/DQ) graph quantizes, read back as ModelOpt quantizers of the detector.

:func:`read_quantization` maps every quantized detector Conv / Gemm of the graph to its module
(through its weight's name, as the QAT fine-tune maps them), and every activation
QuantizeLinear to the ``<module>.input_quantizer`` / ``.output_quantizer`` that models it,
with ModelOpt's amax for the graph's grid. It refuses, with the reason, a graph that ModelOpt's
symmetric per-tensor quantizers cannot reproduce, so parity judges that graph against FP32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ctmask.training.qat import module_of_weight, output_owner

SYMMETRIC_GRIDS = {("int8", 0), ("uint8", 128)}
"""(element type, zero-point) of the activation grids ModelOpt reproduces: signed symmetric,
or the same grid shifted into uint8 (the cpu form of QAT scales)."""


@dataclass
class Activation:
    """One quantized activation tensor of an INT8 graph."""

    tensor: str
    dequantized: str
    scale: float
    zero_point: int
    dtype: str
    quantizers: set[str] = field(default_factory=set)
    dequantized_grid: tuple[float, int, str] | None = None
    """The DequantizeLinear's (scale, zero-point, type) where it differs from the QuantizeLinear's."""


@dataclass
class GraphQuantization:
    """The graph's quantization in ModelOpt's terms (see :func:`read_quantization`)."""

    activations: dict[str, Activation]
    weights: set[str]
    amax: dict[str, float]
    residual: str = "float"
    """What the residual and top-down paths read (:data:`ctmask.calibration.ranges.RESIDUAL_FORMS`)."""

    def mismatched_grids(self) -> list[str]:
        """Activations whose DequantizeLinear reads another grid than its QuantizeLinear wrote
        (values come out scaled or shifted): parity's ``int8.grids`` line."""
        return [f"{a.tensor} (quantized at scale {a.scale:.6g}, zero-point {a.zero_point}; dequantized at "
                f"{a.dequantized_grid[0]:.6g}, {a.dequantized_grid[1]})"
                for a in self.activations.values() if a.dequantized_grid is not None]


class _Refused(Exception):
    pass


class GraphIndex:
    """Lookups over a graph: producers, readers, constant values (initializers or Constant nodes)."""

    def __init__(self, proto: onnx.ModelProto):
        self.produced = {o: n for n in proto.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in proto.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in proto.graph.initializer}

    def op(self, name: str) -> str:
        node = self.produced.get(name)
        return node.op_type if node is not None else ""

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.produced.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def grid(self, node: onnx.NodeProto) -> tuple[float, int, str]:
        """(scale, zero-point, element type) of a Q or DQ node; refused unless per tensor and constant."""
        scale = self.constant(node.input[1]) if len(node.input) > 1 else None
        if scale is None or scale.size != 1:
            raise _Refused(f"{node.op_type} {node.name or node.output[0]!r} has "
                           + ("a non-constant scale" if scale is None else f"{scale.size} scales (per channel)")
                           + ": ModelOpt's activation quantizers are per tensor")
        if len(node.input) > 2 and node.input[2]:
            zp = self.constant(node.input[2])
            if zp is None or zp.size != 1:
                raise _Refused(f"{node.op_type} {node.name or node.output[0]!r} has a non-constant or per-channel "
                               "zero-point")
        else:
            zp = np.zeros((), np.uint8)  # ONNX: no zero-point means uint8, zero-point 0
        return float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]), str(zp.dtype)

    def pairs(self, tensor: str) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
        """Every (QuantizeLinear, DequantizeLinear) pair that quantizes ``tensor``."""
        return [(q, dq) for q in self.readers.get(tensor, []) if q.op_type == "QuantizeLinear"
                for dq in self.readers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"]

    def quantize_of(self, dq_output: str) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
        """(QuantizeLinear, DequantizeLinear) behind a DQ output, or None."""
        dq = self.produced.get(dq_output)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.produced.get(dq.input[0])
        return (q, dq) if q is not None and q.op_type == "QuantizeLinear" else None


def _activation(g: GraphIndex, q: onnx.NodeProto, dq: onnx.NodeProto) -> Activation:
    scale, zp, dtype = g.grid(q)
    if (dtype, zp) not in SYMMETRIC_GRIDS:
        raise _Refused(f"activation {q.input[0]!r} has an asymmetric {dtype} grid (zero-point {zp}): ModelOpt's "
                       "quantizers are symmetric (calibrated cpu-form graphs are judged against FP32; quantize "
                       "from QAT scales for a fake-quantized reference)")
    dq_grid = g.grid(dq)
    same = dq_grid[1:] == (zp, dtype) and math.isclose(dq_grid[0], scale, rel_tol=1e-6)
    return Activation(q.input[0], dq.output[0], scale, zp, dtype, dequantized_grid=None if same else dq_grid)


def _one_grid(seen: Activation | None, new: Activation) -> Activation:
    """The activation a tensor is quantized with; refused when two Q/DQ pairs put it on two grids."""
    if seen is None:
        return new
    if (seen.dtype, seen.zero_point) != (new.dtype, new.zero_point) \
            or not math.isclose(seen.scale, new.scale, rel_tol=1e-5):
        raise _Refused(f"{new.tensor!r} is quantized twice on different grids (scale {seen.scale:.6g} and "
                       f"{new.scale:.6g}): one tensor has one grid in ModelOpt's model")
    seen.dequantized_grid = seen.dequantized_grid or new.dequantized_grid  # any DequantizeLinear off its grid
    return seen


def _scan(g: GraphIndex, proto: onnx.ModelProto) -> tuple[dict[str, Activation], set[str], set[str]]:
    """(detector activations, detector modules with int8 weights, tensors quantized for other nodes)."""
    inputs: dict[str, Activation] = {}
    outputs: dict[str, Activation] = {}
    weights: set[str] = set()
    foreign: set[str] = set()
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 \
                or g.op(node.input[1]) != "DequantizeLinear":
            continue
        module = module_of_weight(g.produced[node.input[1]].input[0].removesuffix("_quantized"))
        if module is None:  # not a detector block: a quantized S is judged by s.logits
            foreign.update(g.produced[i].input[0] for i in node.input[:1] if g.op(i) == "DequantizeLinear")
            foreign.add(node.output[0])
            continue
        weights.add(module)
        pair = g.quantize_of(node.input[0])
        if pair is None:
            raise _Refused(f"the convolution of {module} has int8 weights but reads a float input: ModelOpt's "
                           "reference quantizes both")
        act = _one_grid(inputs.get(pair[0].input[0]), _activation(g, *pair))
        inputs[act.tensor] = act
        act.quantizers.add(f"{module}.input_quantizer")
        for q, dq in g.pairs(node.output[0]):
            out = _one_grid(outputs.get(node.output[0]), _activation(g, q, dq))
            out.quantizers = {f"{output_owner(module)}.output_quantizer"}
            outputs[node.output[0]] = out
    return {**inputs, **outputs}, weights, foreign


RESIDUAL_READERS = ("Add", "Resize")
"""The nodes that read a convolution's quantized input without being quantized themselves, and
that the ``int8`` residual form models: a ResNet block's identity Add, the FPN's upsampling."""


def _residual_form(g: GraphIndex, acts: dict[str, Activation]) -> str:
    """``int8`` when the unquantized readers of the graph's input-only activations read their
    DequantizeLinear, ``float`` when they read the tensor itself; refused when they do both, when
    a node the reference cannot model reads one in int8, or when a residual reader's pair
    quantizes on another grid than the convolution's (a DequantizeLinear off its QuantizeLinear's
    grid is recorded for ``int8.grids``)."""
    as_int8: list[str] = []
    as_float: list[str] = []
    for act in acts.values():
        if any(q.endswith(".output_quantizer") for q in act.quantizers):
            # a quantized node's output: every reader reads it quantized, in both forms
            raw = [r for r in g.readers.get(act.tensor, []) if r.op_type not in ("QuantizeLinear", "Shape")]
            if raw:
                raise _Refused(f"{raw[0].op_type} {raw[0].name or raw[0].output[0]!r} reads {act.tensor!r}, the "
                               "output of a quantized node, unquantized: the reference quantizes such an output "
                               "for every reader")
            continue
        reads = [(r, pair) for pair in g.pairs(act.tensor) for r in g.readers.get(pair[1].output[0], [])]
        reads += [(r, None) for r in g.readers.get(act.tensor, [])]
        for node, pair in reads:
            if node.op_type in ("QuantizeLinear", "Shape", "Conv", "Gemm", "MatMul"):
                continue
            label = f"{node.op_type} {node.name or node.output[0]!r}"
            if pair is not None and node.op_type not in RESIDUAL_READERS:
                raise _Refused(f"{label} reads {act.tensor!r} in int8: the reference models only the residual "
                               f"paths ({', '.join(RESIDUAL_READERS)}) reading a convolution's quantized input")
            if pair is not None:  # on the convolution's grid, or refused / reported by int8.grids
                _one_grid(act, _activation(g, *pair))
            (as_float if pair is None else as_int8).append(label)
    if as_int8 and as_float:
        raise _Refused(f"some residual / top-down paths read int8 ({as_int8[0]}) and others float ({as_float[0]}): "
                       "the reference models one residual form")
    return "int8" if as_int8 else "float"


def read_quantization(proto: onnx.ModelProto) -> tuple[GraphQuantization | None, str]:
    """The graph's detector quantization as ModelOpt quantizers, or ``(None, why not)``.

    A symmetric int8 grid (zero-point 0) or a uint8 grid with zero-point 128 (the cpu form of
    QAT scales, :func:`ctmask.exporter.precision.cpu_grid`) of scale s is ModelOpt's grid of
    amax 127 s. Refused: per-channel or non-constant activation grids, asymmetric grids,
    quantized weights behind a float input, a quantizer with two scales (the RPN head runs on
    every FPN level with one set of modules), or an activation QuantizeLinear that is neither
    a quantized convolution's input nor its output (``calibrate --ops residual``), residual
    paths read in float and in int8 both (:func:`_residual_form`).
    """
    g = GraphIndex(proto)
    try:
        acts, weights, foreign = _scan(g, proto)
        if not weights:
            return None, "the graph quantizes no detector convolution"
        amax: dict[str, float] = {}
        for act in acts.values():
            for q in act.quantizers:
                a = 127.0 * act.scale
                if q in amax and not math.isclose(amax[q], a, rel_tol=1e-5):
                    raise _Refused(f"{q} runs at two scales in the graph ({amax[q] / 127:.6g} and {act.scale:.6g}): "
                                   "one ModelOpt quantizer cannot model both (the RPN head shares its modules across "
                                   "the FPN levels: ranges that differ per level, from a calibration or from QAT "
                                   "scales with the FPN kept FP32)")
                amax[q] = a
        known = {a.tensor for a in acts.values()} | foreign
        for node in proto.graph.node:
            if node.op_type == "QuantizeLinear" and node.input[0] not in g.inits and node.input[0] not in known:
                readers = sorted({r.op_type for dq in g.readers.get(node.output[0], [])
                                  for r in g.readers.get(dq.output[0], [])})
                raise _Refused(f"the graph quantizes {node.input[0]!r} (read by {', '.join(readers) or 'nothing'}), "
                               "no quantized convolution's input or output (calibrate --ops residual quantizes Add "
                               "/ Relu / MaxPool): ModelOpt's reference does not model it")
        residual = _residual_form(g, acts)
    except _Refused as exc:
        return None, str(exc)
    return GraphQuantization(acts, weights, amax, residual), ""
