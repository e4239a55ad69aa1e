"""What TensorRT's ONNX parser and builder accept, as data: the operator matrix of each
TensorRT major version, its opset range, limits and per-operator restriction checks.

Sources (paraphrased, not copied; each rule below names its own):

* [OPS-10.15] onnx-tensorrt ``docs/operators.md`` of TensorRT 10.15, the newest 10.x
  matrix found: opsets 9 to 24 inclusive; per-operator supported types and restrictions;
  DOUBLE cast down to FLOAT; INT8/INT4/FP8/FP4 are "quantized types" reachable only by
  quantizing a wider float; UINT8 only as a network input or output type.
* [OPS-10.0] the same file of TensorRT 10.0: opsets 9 to 20 (so opsets 21..24 need a later
  10.x release).
* [IMP-10] onnx-tensorrt ``onnxOpImporters.cpp`` of the 10.x branch, read where the matrix
  is silent or disagrees with it: NonMaxSuppression clamps ``max_output_boxes_per_class``
  to INT32_MAX before casting it to INT32; RoiAlign becomes the ``ROIAlign_TRT`` plugin
  (version 2, ``libnvinfer_plugin``) with ``batch_indices`` cast to INT32; ScatterElements
  with a reduction becomes the ``ScatterElements`` plugin (version 2); TopK takes K as a
  (shape) tensor input; Q/DQ: scale coefficients must all be positive, zero-points must be
  all zero, a UINT8 zero-point is replaced by INT8 (with a warning), only INT8 / FP8 / INT4
  are quantized types, a per-axis scale must have one coefficient per channel of ``axis``
  (axis 0 when the attribute is absent, where ONNX says 1); Clip on INT32/INT64 works
  through elementwise layers; Range accepts FP32, INT32 and INT64 only; Gather-family
  indices are cast to INT32 unless the data is INT64.
* [CHANGELOG] onnx-tensorrt ``docs/Changelog.md``: 9.0 stopped casting INT64 to INT32
  (INT64 is native since); 8.6 added dynamic K for TopK; 10.0 added ScatterElements
  reductions and ``wrap`` padding.
* [OP-TOPK] TensorRT Operators documentation, TopK (10.x): K <= 3840 and K <= the reduced
  dimension; input, values and indices at most 2^31 - 1 elements. The [OPS-10.15] table
  says "less than 3840"; ITopKLayer::setK (10.x C++ API) says values up to 3840: we allow
  3840 and report K == 3840 as a warning.
* [OP-NMS] TensorRT Operators documentation, NMS (10.x) / INMSLayer::setTopKBoxLimit: at
  most the TopK box limit candidates per batch item are considered, default and maximum
  2000 on SM 5.3 / 6.2 devices (Jetson Nano / TX2), 5000 otherwise; IoU threshold in [0, 1].
* [OP-QDQ] TensorRT Operators documentation, Quantize / Dequantize: the scale must be a
  build-time constant scalar or 1-D; the zero-point, if set, must be all zeros; input
  (Dequantize) is a quantized type, float32 scale.
* [OP-EW] TensorRT Operators documentation, ElementWise: both inputs have one type T1.
* [ROIALIGN] TensorRT OSS ``plugin/roiAlignPlugin/README.md``: mode avg or max,
  coordinate transformation half_pixel or output_half_pixel, sampling_ratio >= 0, output
  sizes >= 1, spatial_scale > 0.
* [TRT11] TensorRT 10.x -> 11.x migration guide and 11.0 / 11.5 release notes: 11.x removes
  weak typing (every network is strongly typed, the STRONGLY_TYPED flag is ignored); the
  parser adds Swish (11.0) and opset 25 (11.5); plugins batchTile, clip, coordConvAC,
  cropAndResize, gelu, leakyRelu, normalize, singleStepLSTM, specialSlice, split, nms and
  proposal are removed (11.0); ROIAlign_TRT stays.

No TensorRT 11 ``operators.md`` was found. The 11.x table is the 10.15 one plus Swish, with
the opset range 9..24 (11.0 to 11.4; 11.5 adds 25, reported as a warning), on the
assumption that a major release keeps its predecessor's importers unless its release notes
say otherwise (they list only additions and plugin removals).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctmask.core.errors import FATAL, INFO, SEVERITIES, WARNING  # noqa: F401 (the tables use them)

TOPK_MAX_K = 3840
"""Largest K of a TensorRT TopK layer [OP-TOPK]."""

NMS_TOPK_BOX_LIMIT = 5000
"""INMSLayer TopK box limit (candidates considered per batch item), default and maximum [OP-NMS]."""

NMS_TOPK_BOX_LIMIT_SM53_62 = 2000
"""The same limit on SM 5.3 / 6.2 devices (Jetson Nano, TX2) [OP-NMS]."""

INT32_MAX = 2**31 - 1
MAX_VOLUME = 2**31 - 1
"""Elements of one tensor TensorRT's TopK accepts (and most layers' documented volume limit) [OP-TOPK]."""

# ONNX TensorProto element types -> the names the matrix uses.
ONNX_TYPE_NAMES: dict[int, str] = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING", 9: "BOOL",
    10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BF16",
    17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4", 23: "FP4",
}
QUANTIZED_TYPES = frozenset({"INT8", "FP8", "INT4", "FP4"})
"""Reachable only by quantizing a wider float (Q/DQ) [OPS-10.15]."""

FLOAT_TYPES = frozenset({"FP32", "FP16", "BF16", "DOUBLE"})


@dataclass(frozen=True)
class NodeFacts:
    """What a restriction check may ask about one node (filled in by :mod:`ctmask.trt.check`).

    Attributes:
        op: the node's op_type.
        attrs: attribute name -> Python value (strings decoded).
        inputs: input names ('' for an omitted optional input).
        opset: the default domain's opset of the model.
        const: ``const(i)`` is input ``i``'s value when it is a build-time constant, else None.
        rank: ``rank(i)`` is input ``i``'s rank when known, else None.
        outputs_used: for each output, whether anything consumes it (or it is a graph output).
    """

    op: str
    attrs: Mapping[str, Any]
    inputs: tuple[str, ...]
    opset: int
    const: Callable[[int], np.ndarray | None]
    rank: Callable[[int], int | None]
    outputs_used: tuple[bool, ...] = ()

    def has_input(self, i: int) -> bool:
        return i < len(self.inputs) and self.inputs[i] != ""


Problem = tuple[str, str]
"""(severity, message) of one restriction a node breaks."""

RestrictionCheck = Callable[[NodeFacts], list[Problem]]


@dataclass(frozen=True)
class OpSupport:
    """One row of the matrix.

    Attributes:
        supported: the parser imports the op.
        types: element types the op accepts on its checked tensors (matrix names).
        restriction: the matrix's restriction, paraphrased ('' when none).
        ports: which inputs ``types`` applies to: indices, ``"all"`` (every present
            input), or ``"out"`` (output 0, for ops without data inputs, e.g. Constant).
        check: the restriction as code, where it can be decided from the graph.
    """

    supported: bool
    types: frozenset[str] = frozenset()
    restriction: str = ""
    ports: tuple[int, ...] | str = (0,)
    check: RestrictionCheck | None = field(default=None, compare=False)


# ---- restriction checks (one small function per operator that has one) ------------------


def _dilations_ones(f: NodeFacts) -> list[Problem]:
    d = f.attrs.get("dilations")
    if d and any(int(v) != 1 for v in d):
        return [(FATAL, f"dilations {list(d)} are not supported: they must be empty or all ones")]
    return []


def _pooling(f: NodeFacts) -> list[Problem]:
    problems = _dilations_ones(f)
    r = f.rank(0)
    if r is not None and r not in (4, 5):
        problems.append((FATAL, f"only 2D or 3D pooling is supported, input rank is {r}"))
    if f.op == "MaxPool" and len(f.outputs_used) > 1 and f.outputs_used[1]:
        problems.append((FATAL, "the Indices output of MaxPool is not supported"))
    return problems


def _resize(f: NodeFacts) -> list[Problem]:
    """[OPS-10.15] Resize row; [IMP-10] also maps mode 'cubic' (outermost 2 dims only)."""
    problems: list[Problem] = []
    mode = f.attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        problems.append((FATAL, f"resize mode {mode!r} is not supported (nearest, linear)"))
    elif mode == "cubic":
        problems.append((WARNING, "mode 'cubic' is outside the matrix (nearest, linear); the 10.x importer maps it "
                                  "to cubic resizing of the 2 innermost dimensions only"))
    if f.opset >= 11:
        ctm = f.attrs.get("coordinate_transformation_mode", "half_pixel")
        if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
            problems.append((FATAL, f"coordinate_transformation_mode {ctm!r} is not supported (half_pixel, "
                                    "pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, align_corners)"))
        nm = f.attrs.get("nearest_mode", "round_prefer_floor")
        if mode == "nearest" and nm not in ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"):
            problems.append((FATAL, f"nearest_mode {nm!r} is not supported"))
    if int(f.attrs.get("antialias", 0)):
        problems.append((FATAL, "antialias=1 is not supported"))
    policy = f.attrs.get("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        problems.append((FATAL, f"keep_aspect_ratio_policy {policy!r} is not supported (stretch only)"))
    axes = f.attrs.get("axes")
    scales_tensor = f.has_input(2) and f.const(2) is None
    if axes and scales_tensor and (f.rank(0) is None or list(axes) != list(range(f.rank(0) or 0))):
        problems.append((FATAL, "with a runtime scales tensor, axes must be 0..rank-1 in order"))
    return problems


def _roi_align(f: NodeFacts) -> list[Problem]:
    """[ROIALIGN] plugin parameters; [IMP-10] maps only half_pixel to 1, anything else to 0."""
    problems: list[Problem] = []
    mode = f.attrs.get("mode", "avg")
    if mode not in ("avg", "max"):
        problems.append((FATAL, f"mode {mode!r} is not supported by ROIAlign_TRT (avg, max)"))
    ctm = f.attrs.get("coordinate_transformation_mode", "half_pixel")
    if f.opset >= 16 and ctm not in ("half_pixel", "output_half_pixel"):
        problems.append((FATAL, f"coordinate_transformation_mode {ctm!r} is not supported (half_pixel, "
                                "output_half_pixel)"))
    if int(f.attrs.get("sampling_ratio", 0)) < 0:
        problems.append((FATAL, "sampling_ratio must be >= 0 (0: adaptive)"))
    for a in ("output_height", "output_width"):
        if int(f.attrs.get(a, 1)) < 1:
            problems.append((FATAL, f"{a} must be >= 1"))
    if float(f.attrs.get("spatial_scale", 1.0)) <= 0:
        problems.append((FATAL, "spatial_scale must be > 0"))
    r = f.rank(1)
    if r is not None and r != 2:
        problems.append((FATAL, f"rois must be 2-D [num_rois, 4], rank is {r}"))
    return problems


def _nms(f: NodeFacts) -> list[Problem]:
    """[IMP-10]: boxes and scores 3-D, center_point_box 0 or 1; [OP-NMS]: IoU threshold in [0, 1]."""
    problems: list[Problem] = []
    cpb = int(f.attrs.get("center_point_box", 0))
    if cpb not in (0, 1):
        problems.append((FATAL, f"center_point_box={cpb} is not supported (0: corners, 1: center/size)"))
    for i, what in ((0, "boxes"), (1, "scores")):
        r = f.rank(i)
        if r is not None and r != 3:
            problems.append((FATAL, f"{what} must be 3-D, rank is {r}"))
    iou = f.const(3) if f.has_input(3) else None
    if iou is not None and iou.size == 1 and not 0.0 <= float(iou.reshape(-1)[0]) <= 1.0:
        problems.append((FATAL, f"iou_threshold {float(iou.reshape(-1)[0])} is outside [0, 1]"))
    return problems


def _topk(f: NodeFacts) -> list[Problem]:
    """[OPS-10.15]: sorted must be 1 (K itself: :func:`ctmask.trt.check` with the graph's shapes)."""
    if int(f.attrs.get("sorted", 1)) != 1:
        return [(WARNING, "sorted=0: the matrix requires sorted=1; TensorRT returns sorted output, which sorted=0 "
                          "allows")]
    return []


def _pad(f: NodeFacts) -> list[Problem]:
    """[IMP-10] / [CHANGELOG]: constant, reflect, edge, wrap (10.0)."""
    mode = f.attrs.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        return [(FATAL, f"pad mode {mode!r} is not supported (constant, reflect, edge, wrap)")]
    return []


CAST_TARGETS = frozenset({"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"})
"""Cast row of [OPS-10.15]."""


def _cast(f: NodeFacts) -> list[Problem]:
    to = ONNX_TYPE_NAMES.get(int(f.attrs.get("to", 0)), f"type {f.attrs.get('to')}")
    if to == "DOUBLE":
        return [(WARNING, "cast to DOUBLE: TensorRT casts DOUBLE down to FP32 (clamping to +-FLT_MAX)")]
    if to in QUANTIZED_TYPES:
        return [(FATAL, f"cast to {to}: a quantized type is produced by QuantizeLinear only, not by Cast")]
    if to not in CAST_TARGETS:
        return [(FATAL, f"cast to {to} is not supported ({', '.join(sorted(CAST_TARGETS))})")]
    return []


def _scatter_elements(f: NodeFacts) -> list[Problem]:
    """[IMP-10]: a reduction other than none goes to the ScatterElements plugin (v2)."""
    red = f.attrs.get("reduction", "none")
    if red != "none":
        return [(WARNING, f"reduction {red!r} is imported as the ScatterElements plugin (version 2) of "
                          "libnvinfer_plugin: the builder must load TensorRT's plugin library")]
    return []


def _scatter_nd(f: NodeFacts) -> list[Problem]:
    red = f.attrs.get("reduction", "none")
    if red != "none":
        return [(FATAL, f"reduction {red!r} is not supported (none only)")]
    return []


def _gather_nd(f: NodeFacts) -> list[Problem]:
    b = int(f.attrs.get("batch_dims", 0))
    r0, r1 = f.rank(0), f.rank(1)
    if b < 0 or (r0 is not None and b >= r0) or (r1 is not None and b >= r1):
        return [(FATAL, f"batch_dims={b} must be >= 0 and below the ranks of data and indices")]
    return []


def _reduce(f: NodeFacts) -> list[Problem]:
    """[OPS-10.15]: ``axes`` must be an initializer (input 1 from opset 18, else an attribute)."""
    if f.opset >= 18 and f.has_input(1) and f.const(1) is None:
        return [(FATAL, "axes must be a build-time constant (an initializer)")]
    return []


def _softmax(f: NodeFacts) -> list[Problem]:
    r = f.rank(0)
    axis = int(f.attrs.get("axis", -1 if f.opset >= 13 else 1))
    if r is not None and not -r <= axis < max(r, 1):
        return [(FATAL, f"axis {axis} is outside the input's rank {r}")]
    return []


def _axes_constant(f: NodeFacts) -> list[Problem]:
    """[OPS-10.15] Squeeze / Unsqueeze: axes must resolve to a constant."""
    if f.opset >= 13 and f.has_input(1) and f.const(1) is None:
        return [(FATAL, "axes must be resolvable to a build-time constant")]
    return []


def _cumsum(f: NodeFacts) -> list[Problem]:
    if f.has_input(1) and f.const(1) is None:
        return [(FATAL, "axis must be a build-time constant")]
    return []


def _dropout(f: NodeFacts) -> list[Problem]:
    if f.has_input(2):
        v = f.const(2)
        if v is None:
            return [(FATAL, "training_mode must be an initializer")]
        if bool(np.asarray(v).reshape(-1)[0]):
            return [(FATAL, "training_mode must be False")]
    return []


def _one_hot(f: NodeFacts) -> list[Problem]:
    if f.const(1) is None:
        return [(FATAL, "depth must be a build-time constant")]
    return []


def _constant(f: NodeFacts) -> list[Problem]:
    bad = [a for a in ("sparse_value", "value_string", "value_strings") if a in f.attrs]
    return [(FATAL, f"attribute {bad[0]} is not supported")] if bad else []


def _layer_norm(f: NodeFacts) -> list[Problem]:
    if any(f.outputs_used[1:]):
        return [(FATAL, "only the first output (Y) is supported")]
    return []


def _lstm(f: NodeFacts) -> list[Problem]:
    problems: list[Problem] = []
    if int(f.attrs.get("input_forget", 0)):
        problems.append((FATAL, "input_forget must be 0"))
    if int(f.attrs.get("layout", 0)):
        problems.append((FATAL, "layout must be 0"))
    return problems


def _grid_sample(f: NodeFacts) -> list[Problem]:
    r = f.rank(0)
    return [(FATAL, f"input must be 4-D, rank is {r}")] if r is not None and r != 4 else []


def _conv_weights(f: NodeFacts) -> list[Problem]:
    r = f.rank(0)
    if r is not None and r not in (3, 4, 5):
        return [(FATAL, f"only 1D, 2D or 3D convolutions are supported, input rank is {r}")]
    return []


# ---- the matrix ----------------------------------------------------------------------------

F = "FP32 FP16 BF16"
FI = F + " INT32 INT64"
FIB = FI + " BOOL"
ALL = "all"


def Y(types: str, restriction: str = "", check: RestrictionCheck | None = None,
      ports: tuple[int, ...] | str = (0,)) -> OpSupport:
    """A supported row."""
    return OpSupport(True, frozenset(types.split()), restriction, ports, check)


def N(restriction: str = "") -> OpSupport:
    """An unsupported row."""
    return OpSupport(False, frozenset(), restriction)


_BIDIR = "both directions of a bidirectional layer must use the same activations"
_AXES_INIT = "axes must be an initializer"

OPS_10: dict[str, OpSupport] = {
    # [OPS-10.15], row by row; restrictions paraphrased. Types apply to the data input(s).
    "Abs": Y(FI), "Acos": Y(F), "Acosh": Y(F), "Add": Y(FI, ports=ALL), "AffineGrid": N(),
    "And": Y("BOOL", ports=ALL), "ArgMax": Y(FI), "ArgMin": Y(FI), "Asin": Y(F), "Asinh": Y(F),
    "Atan": Y(F), "Atanh": Y(F),
    "Attention": Y(F + " INT8 FP8", "Q, K, V and attn_mask 4-D; no past_key / past_value / nonpad_kv_seqlen "
                                    "inputs, no present_* / qk_matmul_output outputs, no qk_matmul_output_mode / "
                                    "softcap; head counts from the shapes of Q and K/V"),
    "AveragePool": Y(F, "2D or 3D pooling; dilations empty or all ones", _pooling),
    "BatchNormalization": Y(F), "Bernoulli": N(), "BitShift": N(), "BitwiseAnd": N(), "BitwiseNot": N(),
    "BitwiseOr": N(), "BitwiseXor": N(), "BlackmanWindow": Y("FP32 FP16", ports="out"),
    "Cast": Y("FP32 FP16 BF16 INT32 INT64 UINT8 BOOL", "target: one of the listed types", _cast),
    "CastLike": Y("FP32 FP16 BF16 INT32 INT64 UINT8 BOOL"), "Ceil": Y(F), "Col2Im": N(), "Celu": Y(F),
    "CenterCropPad": N(),
    # [IMP-10]: INT32/INT64 inputs are clipped with elementwise layers (the matrix lists floats only).
    "Clip": Y(FI, "no UINT8 input; tensor min / max use elementwise layers"), "Compress": N(),
    "Concat": Y(FIB, ports=ALL), "ConcatFromSequence": N(),
    "Constant": Y(F + " FP8 FP4 INT4 INT32 INT64 BOOL", "no sparse_value / value_string / value_strings", _constant,
                  ports="out"),
    "ConstantOfShape": Y(F + " FP8 FP4 INT4 INT32 INT64 BOOL", ports="out"),
    "Conv": Y(F, check=_conv_weights), "ConvInteger": N(), "ConvTranspose": Y(F, check=_conv_weights),
    "Cos": Y(F), "Cosh": Y(F), "CumSum": Y(F, "axis a build-time constant", _cumsum), "DFT": N(),
    "DeformConv": Y("FP32 FP16", "1D or 2D spatial input; equal begin/end pads per spatial axis"),
    "DepthToSpace": Y(FI),
    "DequantizeLinear": Y("INT8 FP8 FP4 INT4", "x_zero_point must be zero"), "Det": N(),
    "Div": Y(FI, ports=ALL),
    "Dropout": Y(F, "is_training an initializer and False", _dropout),
    "DynamicQuantizeLinear": N("compose TensorRT's IDynamicQuantize from ONNX ops in a local function"),
    "Einsum": Y(F), "Elu": Y(F), "Equal": Y(FI, ports=ALL), "Erf": Y(F), "Exp": Y(F), "Expand": Y(FIB),
    "EyeLike": Y(FIB, "input with static dimensions"), "Flatten": Y(FIB), "Floor": Y(F),
    "Gather": Y(FIB), "GatherElements": Y(FIB), "GatherND": Y(FIB, "batch_dims within the ranks", _gather_nd),
    "Gelu": Y(F + " INT8 INT32 INT64"), "Gemm": Y(F), "GlobalAveragePool": Y(F), "GlobalLpPool": Y(F),
    "GlobalMaxPool": Y(F), "Greater": Y(FI, ports=ALL), "GreaterOrEqual": Y(FI, ports=ALL),
    "GridSample": Y("FP32 FP16", "4-D input", _grid_sample), "GroupNormalization": Y(F), "GRU": Y(F, _BIDIR),
    "HammingWindow": Y("FP32 FP16", ports="out"), "HannWindow": Y("FP32 FP16", ports="out"),
    "HardSigmoid": Y(F), "HardSwish": Y(F), "Hardmax": Y(F, "the axis dimension a build-time constant"),
    "Identity": Y(FIB), "If": Y(FIB, "branch outputs of equal rank and distinct names"), "ImageScaler": Y(F),
    "ImageDecoder": N(), "InstanceNormalization": Y(F), "IsInf": Y(F), "IsNaN": Y(FI),
    "LayerNormalization": Y(F, "only the first output Y", _layer_norm), "LeakyRelu": Y(F),
    "Less": Y(FI, ports=ALL), "LessOrEqual": Y(FI, ports=ALL), "Log": Y(F), "LogSoftmax": Y(F),
    "Loop": Y(FIB, "scan outputs of static length; loop-carried shapes constant across iterations"),
    "LRN": Y(F), "LSTM": Y(F, _BIDIR + "; input_forget 0; layout 0", _lstm), "LpNormalization": Y(F),
    "LpPool": Y(F, "dilations empty or all ones", _dilations_ones), "MatMul": Y(F), "MatMulInteger": N(),
    "Max": Y(FI, ports=ALL),
    "MaxPool": Y(F, "2D or 3D pooling; no Indices output; dilations empty or all ones", _pooling),
    "MaxRoiPool": N(), "MaxUnpool": N(), "Mean": Y(F + " FP8 INT32 INT64", ports=ALL),
    "MeanVarianceNormalization": Y(F), "MelWeightMatrix": N(), "Min": Y(FI, ports=ALL),
    "Mish": Y("FP32 FP16"), "Mod": Y(FI, ports=ALL), "Mul": Y(FI, ports=ALL), "Multinomial": N(),
    "Neg": Y(FI), "NegativeLogLikelihoodLoss": N(),
    "NonMaxSuppression": Y("FP32 FP16", "INMSLayer: TopK box limit per batch item", _nms),
    "NonZero": Y("FP32 FP16"), "Not": Y("BOOL"),
    "OneHot": Y(FIB, "depth a build-time constant", _one_hot, ports=(2,)),
    "Optional": N(), "OptionalGetElement": N(), "OptionalHasElement": N(), "Or": Y("BOOL", ports=ALL),
    "Pad": Y(FI, "modes constant, reflect, edge, wrap", _pad), "ParametricSoftplus": Y(F),
    "Pow": Y(FI, ports=ALL), "PRelu": Y(F, ports=ALL), "QLinearConv": N(), "QLinearMatMul": N(),
    "QuantizeLinear": Y(F, "y_zero_point must be 0"),
    "RandomNormal": Y(F, "seed ignored", ports="out"), "RandomNormalLike": Y(F, "seed ignored"),
    "RandomUniform": Y(F, "seed ignored", ports="out"), "RandomUniformLike": Y(F, "seed ignored"),
    # [IMP-10]: start, limit and delta of one type, FP32, INT32 or INT64 (the matrix also lists FP16/BF16).
    "Range": Y("FP32 INT32 INT64", "start, limit, delta of one type", ports=ALL),
    "Reciprocal": Y(F),
    **{op: Y(FI, _AXES_INIT, _reduce) for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "RegexFullMatch": N(), "Relu": Y(FI), "Reshape": Y(FIB),
    "Resize": Y(F, "coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, "
                   "align_corners; modes nearest, linear; nearest modes floor, ceil, round_prefer_floor, "
                   "round_prefer_ceil; aspect policy stretch; runtime scales need iota axes; no antialiasing",
                _resize),
    "ReverseSequence": Y(FIB), "RMSNormalization": Y(F), "RNN": Y(F, _BIDIR),
    "RoiAlign": Y("FP32 FP16", "imported as the ROIAlign_TRT plugin (v2) of libnvinfer_plugin", _roi_align,
                  ports=(0, 1)),
    "RotaryEmbedding": Y(F, "position_ids INT64"), "Round": Y(F),
    "STFT": Y("FP32", "frame_step and window initializers; real-valued input"), "ScaledTanh": Y(F), "Scan": Y(F),
    "Scatter": Y(FI), "ScatterElements": Y(FI, "a reduction uses the ScatterElements plugin", _scatter_elements),
    "ScatterND": Y(FI, "reduction none only", _scatter_nd), "Selu": Y(F),
    "SequenceAt": N(), "SequenceConstruct": N(), "SequenceEmpty": N(), "SequenceErase": N(), "SequenceInsert": N(),
    "SequenceLength": N(), "SequenceMap": N(), "Shape": Y(FIB), "Shrink": Y(FI), "Sigmoid": Y(F), "Sign": Y(FI),
    "Sin": Y(F), "Sinh": Y(F), "Size": Y(FIB), "Slice": Y(FIB),
    "Softmax": Y(F, check=_softmax), "SoftmaxCrossEntropyLoss": N(), "Softplus": Y(F), "Softsign": Y(F),
    "SpaceToDepth": Y(FI), "Split": Y(FIB), "SplitToSequence": N(), "Sqrt": Y(F),
    "Squeeze": Y(FIB, "axes resolvable to a constant", _axes_constant),
    "StringConcat": N(), "StringNormalizer": N(), "StringSplit": N(), "Sub": Y(FI, ports=ALL),
    "Sum": Y(FI, ports=ALL), "Tan": Y(F), "Tanh": Y(F),
    "TensorScatter": Y(F + " INT32", "past_cache and update 4-D; axis -2"), "TfIdfVectorizer": N(),
    "ThresholdedRelu": Y(F), "Tile": Y(FIB),
    "TopK": Y(FI, "sorted must be 1; K at most 3840", _topk), "Transpose": Y(FIB), "Trilu": Y(FIB), "Unique": N(),
    "Unsqueeze": Y(FIB, "axes resolvable to a constant", _axes_constant), "Upsample": Y(F),
    "Where": Y(FIB, ports=(1, 2)), "Xor": Y("BOOL", ports=ALL),
}

OPS_11: dict[str, OpSupport] = {**OPS_10, "Swish": Y(F)}  # [TRT11] 11.0 parser adds Swish

SAME_TYPE_INPUTS: dict[str, tuple[int, ...] | str] = {
    # Inputs that must share one element type: TensorRT's layers take one type T1 [OP-EW] and a
    # strongly typed network inserts no casts. The elementwise rows ("all") come from OPS_10.
    **{op: ALL for op, s in OPS_10.items() if s.ports == ALL and op != "Range"},
    "Range": (0, 1, 2), "Where": (1, 2), "Clip": (0, 1, 2), "Conv": (0, 1, 2), "ConvTranspose": (0, 1, 2),
    "Gemm": (0, 1, 2), "MatMul": (0, 1), "RoiAlign": (0, 1), "NonMaxSuppression": (0, 1), "Pad": (0, 2),
    "LayerNormalization": (0, 1, 2), "GroupNormalization": (0, 1, 2), "InstanceNormalization": (0, 1, 2),
    "Einsum": ALL,
    # Not QuantizeLinear: below opset 19 ONNX allows an FP16 input with an FP32 scale and the importer casts.
}

# Plugin creators of TensorRT's own libnvinfer_plugin (TensorRT OSS ``plugin/`` directory, 10.x),
# found by op_type in the plugin registry when no importer matches; plus the parser's custom Q/DQ ops.
_PLUGINS_10 = frozenset({
    "BatchedNMS_TRT", "BatchedNMSDynamic_TRT", "BatchTilePlugin_TRT", "Clip_TRT", "CoordConvAC", "CropAndResize",
    "CropAndResizeDynamic", "DecodeBbox3DPlugin", "DetectionLayer_TRT", "EfficientNMS_TRT", "EfficientNMS_ONNX_TRT",
    "FlattenConcat_TRT", "GenerateDetection_TRT", "GridAnchor_TRT", "GridAnchorRect_TRT", "GroupNorm",
    "InstanceNormalization_TRT", "LReLU_TRT", "ModulatedDeformConv2d", "MultilevelCropAndResize_TRT",
    "MultilevelProposeROI_TRT", "MultiscaleDeformableAttnPlugin_TRT", "NMS_TRT", "NMSDynamic_TRT", "Normalize_TRT",
    "PillarScatterPlugin", "PriorBox_TRT", "ProposalDynamic", "ProposalLayer_TRT", "PyramidROIAlign_TRT",
    "Region_TRT", "Reorg_TRT", "ResizeNearest_TRT", "ROIAlign_TRT", "RPROI_TRT", "ScatterElements", "ScatterND",
    "SpecialSlice_TRT", "Split", "VoxelGeneratorPlugin", "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear",
    "TRT_INT4QuantizeLinear", "TRT_INT4DequantizeLinear",
})
# [TRT11]: plugins removed in 11.0; parser custom ops added in 11.0.
_PLUGINS_11 = (_PLUGINS_10 - {"BatchTilePlugin_TRT", "Clip_TRT", "CoordConvAC", "CropAndResize", "LReLU_TRT",
                              "Normalize_TRT", "SpecialSlice_TRT", "Split", "NMS_TRT", "ProposalLayer_TRT"}
               | {"TRT_Attention", "TRT_MoE", "TRT_KVCacheUpdate"})


@dataclass(frozen=True)
class TrtTable:
    """Everything :func:`ctmask.trt.check.check_graph` needs to know about one TensorRT major.

    Attributes:
        version: the major version (10, 11).
        opset_min, opset_max: default-domain opsets the newest release of the major parses.
        opset_notes: opset -> (severity, why) for opsets only some releases of the major take.
        ops: the operator matrix.
        plugins: op types the plugin registry resolves (any domain).
        always_strongly_typed: the major has no weak typing.
        source: where the table comes from.
    """

    version: int
    opset_min: int
    opset_max: int
    opset_notes: Mapping[int, Problem]
    ops: Mapping[str, OpSupport]
    plugins: frozenset[str]
    always_strongly_typed: bool
    source: str


TABLES: dict[int, TrtTable] = {
    10: TrtTable(
        10, 9, 24,
        {o: (WARNING, f"opset {o} needs a TensorRT 10 release newer than 10.0 (10.0 parses opsets 9..20, 10.15 "
                      "9..24)") for o in range(21, 25)},
        OPS_10, _PLUGINS_10, False,
        "onnx-tensorrt docs/operators.md (TensorRT 10.15; opset floor 10.0), onnxOpImporters.cpp (10.x), "
        "TensorRT 10.x Operators documentation"),
    11: TrtTable(
        11, 9, 24,
        {25: (WARNING, "opset 25 needs TensorRT 11.5 or newer (11.0..11.4 parse opsets 9..24)")},
        OPS_11, _PLUGINS_11, True,
        "the 10.15 matrix plus the TensorRT 11.0 / 11.5 release notes and the 10.x -> 11.x migration guide "
        "(no 11.x operators.md found)"),
}

# Importer narrowings of INT64 to INT32 [IMP-10]: op -> {input index: how}. Everything else keeps
# INT64 natively since TensorRT 9.0 [CHANGELOG].
INT64_NARROWED: dict[str, dict[int, str]] = {
    "RoiAlign": {2: "cast to INT32 for the ROIAlign_TRT plugin"},
    "NonMaxSuppression": {2: "clamped to INT32_MAX, then cast to INT32"},
    "Gather": {1: "indices cast to INT32 (non-INT64 data)"},
    "GatherElements": {1: "indices cast to INT32 (non-INT64 data)"},
    "GatherND": {1: "indices cast to INT32 (non-INT64 data)"},
    "OneHot": {0: "indices cast to INT32", 1: "depth cast to INT32"},
}
CLAMPED_SENTINELS: dict[tuple[str, int], str] = {
    ("NonMaxSuppression", 2): "the importer takes min(value, INT32_MAX) before the cast, and no class has more "
                              "than INT32_MAX boxes: same selection as ONNX",
}
