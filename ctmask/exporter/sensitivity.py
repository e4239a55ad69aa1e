"""Per-block sensitivity to reduced precision, and the FP32 islands it justifies.

Each candidate block (:data:`ctmask.exporter.precision.BLOCKS`) is run alone in FP16 (or
INT8) while the rest of the graph stays FP32, on the measurement slices; its effect on
the class calls and logits against the FP32 graph (itself proven against PyTorch by
parity) is recorded. Islands are then chosen from the data: a block whose reduction
alone changes a class call stays FP32; the remaining blocks are reduced together, and
while that combination still changes calls the most sensitive of them (largest logit
change alone) returns to FP32 too. Every island carries the measurement that kept it.

Two further measurements put those numbers in proportion:

- the **noise floor**: the FP32 graph itself on the same slices with uniform noise of
  +-0.25 of one 8-bit gray level (``NOISE_GRAY_LEVELS / 255`` of the input range) added to
  its input. No reduced-precision graph can be expected to keep more of the calls than
  the FP32 model keeps against a perturbation smaller than its inputs' own quantisation;
- **per node** (``precision-report --nodes``): every Conv / Gemm / MatMul of the candidate
  blocks reduced alone, the rest FP32, to see whether a few layers carry the damage (keep
  them FP32) or every layer does (the ranking downstream amplifies any change).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from ctmask.core.noise import NOISE_GRAY_LEVELS as NOISE_LEVELS
from ctmask.core.noise import add_gray_noise
from ctmask.core.spec import INPUT
from ctmask.exporter.precision import BLOCKS, convert_fp16, graph_blocks, node_block, quantize_int8, working_copy

CANDIDATES = {
    # ``ranking`` (NMS, TopK, RoIAlign, proposal / box decoding, score softmax) is FP32 by
    # construction: onnxconverter-common never converts NMS / TopK / RoIAlign, the float16
    # pass leaves its decoding with a mistyped Cast, and no Conv / Gemm in it is quantized.
    "fp16": ("backbone.body", "backbone.fpn", "rpn_head", "box_head", "box_predictor", "classifier"),
    "int8": ("backbone.body", "backbone.fpn", "rpn_head", "box_head", "box_predictor", "classifier"),
}
NOISE_GRAY_LEVELS = NOISE_LEVELS[0]
"""Amplitude of the noise-floor measurement's input noise, in 8-bit gray levels (1/255)."""
NODE_OPS = ("Conv", "Gemm", "MatMul")
"""Operators the per-node measurement reduces one at a time (they carry the weights)."""

ALWAYS_FP32 = {"ranking": "FP32 by construction: NMS, TopK and RoIAlign have no reduced-precision path here "
                          "(onnxconverter-common block-lists them; INT8 excludes the block), and "
                          "the decoding and score softmax between them feed the ranking S reads"}


@dataclass
class Effect:
    """What running ``blocks`` in reduced precision did, against the FP32 graph."""

    blocks: list[str]
    n: int
    changed_calls: int
    max_abs_logits: float
    mean_abs_logits: float
    max_abs_score: float
    seconds: float

    @property
    def agreement(self) -> float:
        return 1.0 - self.changed_calls / max(self.n, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "agreement": round(self.agreement, 6)}

    def describe(self) -> str:
        return (f"{self.changed_calls} of {self.n} class calls changed, max |dlogit| {self.max_abs_logits:.3g}, "
                f"max |dscore| {self.max_abs_score:.3g}")


def run_graph(proto: onnx.ModelProto, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Outputs of ``proto`` in onnxruntime (CPU) over ``images`` [M, 1, S, S], as float32."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for i in range(0, len(images), batch_size):
        for k, v in zip(names, sess.run(names, {INPUT: np.ascontiguousarray(images[i:i + batch_size])})):
            parts[k].append(np.asarray(v, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def effect_of(blocks: list[str], reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
              seconds: float) -> Effect:
    d = np.abs(outputs["logits"].astype(np.float64) - reference["logits"])
    changed = int((outputs["logits"].argmax(-1) != reference["logits"].argmax(-1)).sum())
    score = float(np.abs(outputs["rois"][..., 0] - reference["rois"][..., 0]).max()) if len(d) else 0.0
    return Effect(sorted(blocks), len(d), changed, float(d.max()) if len(d) else 0.0,
                  float(d.mean()) if len(d) else 0.0, score, round(seconds, 2))


Reduce = Callable[[onnx.ModelProto, set[str]], onnx.ModelProto]
ReduceNodes = Callable[[onnx.ModelProto, set[str]], onnx.ModelProto]


def _reduction(precision: str, ranges, target: str) -> Callable[..., onnx.ModelProto]:
    """``(fp32 graph, fp32 blocks, only_nodes=None) -> reduced graph`` for ``precision``."""
    if precision == "fp16":
        return convert_fp16
    if precision == "int8":
        if ranges is None:
            raise ValueError("INT8 sensitivity needs calibration ranges")
        return lambda proto, fp32_blocks, only_nodes=None: quantize_int8(proto, ranges, target, fp32_blocks,
                                                                         only_nodes)
    raise ValueError(f"no reduced precision {precision!r}")


def reducer(precision: str, ranges=None, target: str = "tensorrt") -> Reduce:
    """``(fp32 graph, fp32 blocks) -> reduced graph`` for ``precision`` (INT8 needs ``ranges``)."""
    reduce = _reduction(precision, ranges, target)
    return lambda proto, fp32_blocks: reduce(proto, fp32_blocks)


def node_reducer(precision: str, ranges=None, target: str = "tensorrt") -> ReduceNodes:
    """``(fp32 graph, node names) -> graph with only those nodes reduced``."""
    reduce = _reduction(precision, ranges, target)
    return lambda proto, nodes: reduce(proto, set(), only_nodes=nodes)


def noise_floor(proto: onnx.ModelProto, images: np.ndarray, reference: dict[str, np.ndarray],
                gray_levels: float = NOISE_GRAY_LEVELS, seed: int = 0) -> Effect:
    """The FP32 graph's own calls under uniform input noise of +-``gray_levels`` / 255.

    The noise is :func:`ctmask.core.noise.add_gray_noise`'s (seeded per slice, clipped to
    [0, 1]), the same that ``evaluate`` and ``parity`` report, so the measurement repeats exactly.
    """
    t0 = time.perf_counter()
    noisy = add_gray_noise(images, gray_levels, seed)
    return effect_of([], reference, run_graph(proto, noisy), time.perf_counter() - t0)


@dataclass
class NodeEffect:
    """One node reduced alone (the rest of the graph FP32)."""

    node: str
    op_type: str
    block: str
    effect: Effect

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "block": self.block, **self.effect.to_dict()}


def candidate_nodes(proto: onnx.ModelProto, precision: str) -> list[tuple[str, str, str]]:
    """``(name, op_type, block)`` of the weight-carrying nodes of the candidate blocks, in
    graph order, named as the reduction passes name them."""
    blocks = set(CANDIDATES[precision])
    return [(n.name, n.op_type, b) for n in working_copy(proto, set()).graph.node
            if n.op_type in NODE_OPS and (b := node_block(n)) in blocks]


def node_effects(proto: onnx.ModelProto, images: np.ndarray, reference: dict[str, np.ndarray], precision: str,
                 reduce_nodes: ReduceNodes, on_step: Callable[[str], None] | None = None) -> list[NodeEffect]:
    """Every candidate node reduced alone: its effect against the FP32 graph's ``reference``."""
    out = []
    nodes = candidate_nodes(proto, precision)
    for i, (name, op, block) in enumerate(nodes):
        if on_step:
            on_step(f"node {i + 1}/{len(nodes)} {name}")
        t0 = time.perf_counter()
        graph = reduce_nodes(proto, {name})
        out.append(NodeEffect(name, op, block, effect_of([block], reference, run_graph(graph, images),
                                                         time.perf_counter() - t0)))
    return out


@dataclass
class IslandChoice:
    """The measurement and the choice it led to.

    Attributes:
        precision: ``fp16`` or ``int8``.
        reduced: blocks run in reduced precision.
        islands: FP32 block -> why (the measurement that kept it).
        alone: each candidate's effect when it alone is reduced.
        steps: the combined graphs tried, in order.
        final: the effect of the chosen combination (the graph that is exported).
    """

    precision: str
    reduced: list[str]
    islands: dict[str, str]
    alone: list[Effect]
    steps: list[Effect]
    final: Effect
    n_slices: int
    noise: Effect | None = None
    nodes: list[NodeEffect] | None = None

    def to_dict(self) -> dict:
        out = {"precision": self.precision, "reduced": self.reduced, "fp32_islands": self.islands,
               "n_slices": self.n_slices, "alone": [e.to_dict() for e in self.alone],
               "combined_steps": [e.to_dict() for e in self.steps], "final": self.final.to_dict()}
        if self.noise is not None:
            out["noise_floor"] = {"gray_levels": NOISE_GRAY_LEVELS, **self.noise.to_dict()}
        if self.nodes is not None:
            out["nodes"] = [n.to_dict() for n in self.nodes]
        return out


def choose_islands(proto: onnx.ModelProto, images: np.ndarray, precision: str,
                   reduce: Reduce,
                   max_changed_fraction: float = 0.0,
                   on_step: Callable[[str], None] | None = None,
                   s_tolerance: float | None = None,
                   reduce_nodes: ReduceNodes | None = None) -> IslandChoice:
    """Measure every candidate block alone, then choose the FP32 islands (module docstring).

    Args:
        proto: the FP32 graph.
        images: measurement slices [M, 1, S, S] (decoded like inference input).
        precision: ``fp16`` or ``int8``.
        reduce: ``(fp32 graph, fp32 blocks) -> reduced graph`` (:func:`reducer`).
        max_changed_fraction: class calls the combination may change (0: none).
        on_step: progress callback, called with a label before each graph run.
        s_tolerance: parity's ``s.logits`` atol for the precision: S reduced alone may move
            the logits by no more (parity judges S on the graph's own RoIs on every slice).
        reduce_nodes: if given (:func:`node_reducer`), also measure every candidate node
            alone (reported; the islands stay per block).
    """
    present = set(graph_blocks(proto))
    candidates = [b for b in CANDIDATES[precision] if b in present]
    reference = run_graph(proto, images)
    if on_step:
        on_step(f"fp32 + input noise of {NOISE_GRAY_LEVELS:g} gray level")
    noise = noise_floor(proto, images, reference)
    allowed = int(np.floor(max_changed_fraction * len(images) + 1e-9))

    def measure(reduced: list[str]) -> Effect:
        if on_step:
            on_step("+".join(reduced) or "fp32")
        t0 = time.perf_counter()
        graph = reduce(proto, set(BLOCKS) - set(reduced))
        return effect_of(reduced, reference, run_graph(graph, images), time.perf_counter() - t0)

    alone = [measure([b]) for b in candidates]
    by_block = {e.blocks[0]: e for e in alone}
    islands = {b: f"reduced alone: {e.describe()} (at most {allowed} may)" for b, e in by_block.items()
               if e.changed_calls > allowed}
    s_alone = by_block.get("classifier")
    if s_tolerance is not None and s_alone is not None and "classifier" not in islands \
            and s_alone.max_abs_logits > s_tolerance:
        islands["classifier"] = (f"reduced alone: {s_alone.describe()}; S's own error exceeds parity's s.logits "
                                 f"tolerance {s_tolerance:g}")
    reduced = [b for b in candidates if b not in islands]
    steps: list[Effect] = []
    final = None
    while reduced:
        final = measure(reduced)
        steps.append(final)
        if final.changed_calls <= allowed:
            break
        worst = max(reduced, key=lambda b: by_block[b].max_abs_logits)
        islands[worst] = (f"reduced alone: {by_block[worst].describe()}; reduced with {', '.join(reduced)}: "
                          f"{final.describe()}, more than the {allowed} allowed (most sensitive of them)")
        reduced.remove(worst)
        final = None
    if final is None:
        final = effect_of([], reference, reference, 0.0)
    islands.update({b: why for b, why in ALWAYS_FP32.items() if b in present})
    nodes = None if reduce_nodes is None else node_effects(proto, images, reference, precision, reduce_nodes, on_step)
    return IslandChoice(precision, reduced, islands, alone, steps, final, len(images), noise, nodes)
