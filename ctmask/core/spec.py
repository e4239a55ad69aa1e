"""The graph spec: names, shapes, tolerances and metadata of an exported model, written once.

The exporter writes it into the ONNX file (``metadata_props``), the runtime reads it back
from there to drive pre-processing, and the parity checks take their per-output
tolerances from it. ``images [B, 1, S, S] -> rois [B, N, 5], logits [B, 3], probs [B, 3],
boxes [B, N, 4], labels [B, N]``; only ``B`` is symbolic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctmask import __version__
from ctmask.core.errors import ModelError
from ctmask.core.preprocess import LUNG_WINDOW, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, Preprocessing
from ctmask.core.presets import CLASS_NAMES, HEAD_NAMES, SUPPRESSIONS, Preset

FORMAT = "ctmask-onnx/3"
"""Value of the ``ctmask.format`` metadata key; bumped when the graph contract changes."""

UNLABELLED_FORMAT = "ctmask-onnx/2"
"""The format before ``labels``: read and run as it is (its lesion detections are unlabelled)."""

OLD_FORMATS: dict[str, str] = {"ctmask-onnx/1": "its outputs are rois, logits, probs: it has no RoI boxes"}
"""Graph formats of earlier ctmask versions, with what they lack (refused: re-export)."""

OPSET = 18
BATCH = "batch"
INPUT = "images"
OUTPUTS: tuple[str, ...] = ("rois", "logits", "probs", "boxes", "labels")
"""Graph outputs, in order: ranked RoI rows [B, N, 5], S's logits [B, 3], their softmax
[B, 3], each ranked row's decoded box (x1, y1, x2, y2) in input pixels [B, N, 4], and each
row's lesion class id [B, N] (float32: 1 GGO, 2 consolidation, 0 padding). A graph of
:data:`UNLABELLED_FORMAT` has the first four (:attr:`GraphSpec.outputs`)."""


MAX_N_ROIS = 100_000
"""Largest N a graph may declare (the paper's is 256)."""

MAX_CLASSES = 1000
"""Most slice classes a graph may declare (the paper's model has 3)."""

MAX_WINDOW_HU = 100_000.0
"""Bound of a DICOM window's level (absolute) and width, in HU: CT values span a few thousand."""


def _json_field(meta: Mapping[str, str], key: str, path: str | Path, default: str | None = None):
    """``meta[key]`` parsed as JSON; a malformed or absurdly nested value is a :class:`ModelError`
    naming the key (``json`` recurses once per nesting level)."""
    text = meta[key] if default is None else meta.get(key, default)
    try:
        return json.loads(text)
    except RecursionError:
        raise ModelError(f"metadata {key} is JSON nested too deeply to be a ctmask value", path) from None
    except (TypeError, ValueError) as exc:
        raise ModelError(f"metadata {key} is not valid JSON ({exc})", path) from None


def _range_problems(spec: GraphSpec) -> list[str]:
    """Values of ``spec`` outside what any ctmask graph can declare, each naming its metadata key."""
    problems = []
    if not MIN_IMAGE_SIDE <= spec.image_size <= MAX_IMAGE_SIDE:
        problems.append(f"ctmask.input_size: input size {spec.image_size} is outside "
                        f"[{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] pixels")
    if not 1 <= spec.n_rois <= MAX_N_ROIS:
        problems.append(f"ctmask.n_rois: N {spec.n_rois} is outside [1, {MAX_N_ROIS}]")
    names = spec.class_names
    if not all(isinstance(n, str) and n.strip() for n in names):
        problems.append(f"ctmask.class_names: every class name must be a non-empty string, got "
                        f"{[n if isinstance(n, str) else type(n).__name__ for n in names][:10]}")
    elif not 2 <= len(names) <= MAX_CLASSES or len(set(names)) != len(names):
        problems.append(f"ctmask.class_names: expected 2 to {MAX_CLASSES} distinct names, got {len(names)} "
                        f"({len(set(names))} distinct)")
    level, width = spec.window
    if not (math.isfinite(level) and abs(level) <= MAX_WINDOW_HU):
        problems.append(f"ctmask.window: level {level} is not a finite HU value within +-{MAX_WINDOW_HU:g}")
    if not (math.isfinite(width) and 0 < width <= MAX_WINDOW_HU):
        problems.append(f"ctmask.window: width {width} is not in (0, {MAX_WINDOW_HU:g}] HU")
    return problems


def _dims_text(dims: Sequence) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in dims) + "]"


@dataclass(frozen=True)
class Tolerance:
    """Elementwise check ``|actual - expected| <= atol + rtol * |expected|``."""

    atol: float
    rtol: float = 0.0

    def to_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol}


def _declared_tolerances(text: str | None) -> dict[str, Tolerance] | None:
    """The informational ``ctmask.tolerances`` of a graph, or ``None`` when absent or malformed.

    Nothing uses these values to judge a graph (parity takes ctmask's own table,
    :func:`parity_tolerances`), so a malformed entry must not make a model unusable.
    """
    if text is None:
        return None
    try:
        tols = json.loads(text)
        out = {}
        for k, v in tols.items():
            tol = Tolerance(**v)
            out[str(k)] = Tolerance(float(tol.atol), float(tol.rtol))
        return out
    except Exception:  # informational only: any malformation just means "declares nothing usable"
        return None


PARITY_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp32": {
        # RoI scores are softmax outputs in (0, 1]; deltas are encoded box offsets (weights
        # 10, 10, 5, 5), of order 1 and amplified by the coder weights, hence the rtol.
        "rois.score": Tolerance(1e-4),
        "rois.deltas": Tolerance(1e-3, 1e-3),
        # Two candidates may come out in either order only when their reference scores are
        # this close: each score may be off by up to the score atol, so they can cross.
        "rois.order": Tolerance(2e-4),
        # Decoded boxes (x1, y1, x2, y2) in input pixels, on the matched rows (padding: zeros).
        # Measured, graph vs torch: 4.6e-5 px max on runs/robust3/cls.pt (256 held-out slices,
        # S = 192), 3.1e-5 on the test fixture, 5.6e-3 on the untrained paper graph (24
        # slices, S = 512, boxes up to 150 px wide: its deltas' own error, up to 1.6e-4, times w / 5).
        # 2e-2 px + 1e-4 relative (0.07 px at 512) keeps the deltas' margin (~12x); a
        # decoding 1% off or two rows' boxes swapped is off by pixels.
        "boxes": Tolerance(2e-2, 1e-4),
        "logits": Tolerance(1e-3),
        "probs": Tolerance(1e-4),
    },
}
"""ctmask's own parity tolerances per graph precision (``rois`` split into score, delta and
order checks). Parity takes them from here for the precision a graph declares, never from
the graph file, so an edited or converted graph cannot loosen its own pass criteria."""

PARITY_TOLERANCES["fp16"] = {
    # Measured (docs/precision.md): FP16 storage moves detector activations by
    # ~5e-4 relative, which reorders near-tied rows and swaps proposals at the NMS / top-N
    # cuts; per-row agreement is judged loosely, decisions strictly (PARITY_AGREEMENT).
    "rois.score": Tolerance(2e-2),
    "rois.deltas": Tolerance(5e-2, 5e-2),
    "rois.order": Tolerance(4e-2),
    # Measured, runs/robust3/cls.pt, every block but ranking in FP16, 256 slices: on the 16,362
    # of 16,384 rows within the row tolerances, boxes median 7e-4 px, p99.9 8.7e-3, max 1.09
    # px (one row); beyond that only on 8 slices that fail row lines too (moved proposals).
    "boxes": Tolerance(1.0, 5e-3),
    "logits": Tolerance(0.5),
    "probs": Tolerance(5e-2),
    # S on the graph's own RoIs: S's own precision (FP32 island or FP16).
    "s.logits": Tolerance(2e-2),
    # The output softmax is always FP32 (block "other"): probs = softmax(logits) exactly.
    "probs.softmax": Tolerance(1e-4),
}
PARITY_TOLERANCES["int8"] = {
    "rois.score": Tolerance(5e-2),
    "rois.deltas": Tolerance(1e-1, 1e-1),
    "rois.order": Tolerance(1e-1),
    # Twice FP16's, as for the rows. Measured on the INT8-detector graphs of robust3 (which
    # fail parity on rows anyway): rows within the INT8 row tolerances are off by median
    # 0.13-0.15 px, p90 0.47-0.60, p99 2.7-6.3 px, and up to 112 px where a moved proposal
    # yields a candidate of the same score and deltas: boxes see what rows cannot.
    "boxes": Tolerance(2.0, 1e-2),
    "logits": Tolerance(1.0),
    "probs": Tolerance(1e-1),
    # S in INT8 quantizes scores in [0, 1] and deltas of several units with one scale: its
    # own error (0.02-0.2 measured) is not allowed; S stays an FP32 island.
    "s.logits": Tolerance(1e-3),
    "probs.softmax": Tolerance(1e-4),
}

PARITY_AGREEMENT: dict[str, float] = {"fp32": 1.0, "fp16": 0.995, "int8": 0.99}
"""Fraction of class calls a graph of each precision must share with PyTorch FP32."""

PARITY_OFF_TOLERANCE: dict[str, float] = {"fp32": 0.0, "fp16": 0.10, "int8": 0.10}
"""Fraction of slices on which a reduced-precision graph may exceed its row / logit
tolerances (its decisions and ``s.logits`` / ``probs.softmax`` are judged on every slice).
Measured: whole-network FP16 graphs that kept 99.6% of the calls were off tolerance on
6.4% and 7.2% of 250 slices (NMS / top-N swaps). FP32 has none: its only excuse is
PyTorch's own instability (the probe)."""

DEFAULT_TOLERANCES = PARITY_TOLERANCES["fp32"]


def parity_tolerances(precision: str, path: str | Path | None = None) -> dict[str, Tolerance]:
    """The parity tolerances of ``precision`` from ctmask's table.

    Raises:
        ModelError: ctmask has no tolerances for that precision (naming ``path``).
    """
    if precision not in PARITY_TOLERANCES:
        raise ModelError(f"graph declares precision {precision!r}; this ctmask has parity tolerances for "
                         f"{', '.join(PARITY_TOLERANCES)} only", path)
    return dict(PARITY_TOLERANCES[precision])


def _head(name: str) -> str:
    if name not in HEAD_NAMES:
        raise ValueError(f"ctmask.head {name!r} is none of {list(HEAD_NAMES)}")
    return name


def _suppression(name: str) -> str:
    if name not in SUPPRESSIONS:
        raise ValueError(f"ctmask.roi_suppression {name!r} is none of {list(SUPPRESSIONS)}")
    return name


@dataclass(frozen=True)
class GraphSpec:
    """Everything a consumer of an exported graph needs to know about it.

    Attributes:
        preset: preset name of the model.
        image_size: S, square input side in pixels.
        n_rois: N, rows of the ranked RoI output.
        class_names: slice classes in logit order.
        window: (level, width) in HU used to render DICOM input to [0, 1].
        precision: "fp32" (more in later graph passes).
        opset: ONNX opset of the default domain.
        checkpoint_sha256: sha256 of the checkpoint the graph was exported from.
        checkpoint_name: that checkpoint's file name (for people; the hash is the identity).
        version: ctmask version that wrote the graph.
        crop: the model was trained on slices cropped to their body box (``train-cls
            --crop``); the runtime crops with the same boxes before resizing.
        resize: resize method to the input size (``bilinear``).
        weights_sha256: digest of the checkpoint's weights (``weights_digest`` in
            ``ctmask.training.checkpoint``): the identity of the model, whatever file holds it.
        fp32_islands: blocks kept FP32 in a reduced-precision graph (why: the graph's
            ``ctmask.fp32_islands`` metadata).
        int8_target: ``tensorrt`` or ``cpu`` for an INT8 graph (its Q/DQ flavour).
        source_sha256: sha256 of the FP32 graph a reduced-precision graph was made from.
        head: the classifier head inside (``ctmask.core.presets.HEAD_NAMES``): ``paper`` or
            ``pooled``; graphs written before the key existed hold the paper's S.
        labels: the graph outputs each row's lesion class (``labels``); False for a graph of
            :data:`UNLABELLED_FORMAT`, which runs without it.
        suppression: how the ranked RoIs suppress overlaps (``ctmask.core.presets.SUPPRESSIONS``);
            graphs written before the key existed use ``nms``.
        detector_sha256: digest of the detector weights and ranking settings that make the
            graph's ``rois`` (``ctmask.training.roi_cache.detector_digest``); empty for graphs
            written before the key existed.
        declared_tolerances: the tolerances written in the graph file, if read from one
            (informational: parity uses :attr:`tolerances`, ctmask's table for the precision).
    """

    preset: str
    image_size: int
    n_rois: int
    class_names: tuple[str, ...] = CLASS_NAMES
    window: tuple[float, float] = LUNG_WINDOW
    precision: str = "fp32"
    opset: int = OPSET
    checkpoint_sha256: str = ""
    checkpoint_name: str = ""
    version: str = __version__
    crop: bool = False
    resize: str = "bilinear"
    weights_sha256: str = ""
    fp32_islands: tuple[str, ...] = ()
    int8_target: str = ""
    source_sha256: str = ""
    head: str = "paper"
    labels: bool = True
    suppression: str = "nms"
    detector_sha256: str = ""
    declared_tolerances: dict[str, Tolerance] | None = field(default=None, compare=False)

    @property
    def tolerances(self) -> dict[str, Tolerance]:
        """Parity tolerances of the declared precision, from ctmask's own table.

        Raises:
            ModelError: the precision has no entry in the table.
        """
        return parity_tolerances(self.precision)

    @classmethod
    def for_preset(cls, preset: Preset, preprocessing: Preprocessing | None = None, **kwargs) -> GraphSpec:
        """The spec of a model of ``preset``, trained with ``preprocessing`` (default: none)."""
        if preprocessing is not None:
            kwargs.update(crop=preprocessing.crop, resize=preprocessing.resize, window=preprocessing.window)
        return cls(preset=preset.name, image_size=preset.image_size, n_rois=preset.n_rois, head=preset.head,
                   suppression=preset.roi_suppression, **kwargs)

    @property
    def preprocessing(self) -> Preprocessing:
        """The pre-processing the model expects (crop, resize, DICOM window)."""
        return Preprocessing(crop=self.crop, resize=self.resize, window=self.window)

    def input_shape(self, batch: int | str = BATCH) -> tuple[int | str, ...]:
        return (batch, 1, self.image_size, self.image_size)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph's output names, in order: :data:`OUTPUTS` (less ``labels`` for an
        unlabelled graph)."""
        return OUTPUTS if self.labels else OUTPUTS[:4]

    def output_shapes(self, batch: int | str = BATCH) -> dict[str, tuple[int | str, ...]]:
        n_cls = len(self.class_names)
        shapes: dict[str, tuple[int | str, ...]] = {
            "rois": (batch, self.n_rois, 5), "logits": (batch, n_cls), "probs": (batch, n_cls),
            "boxes": (batch, self.n_rois, 4), "labels": (batch, self.n_rois)}
        return {k: shapes[k] for k in self.outputs}

    def metadata(self) -> dict[str, str]:
        """``metadata_props`` entries (all strings) of the exported ONNX file."""
        return {
            "ctmask.format": FORMAT if self.labels else UNLABELLED_FORMAT,
            "ctmask.version": self.version,
            "ctmask.preset": self.preset,
            "ctmask.input_size": str(self.image_size),
            "ctmask.n_rois": str(self.n_rois),
            "ctmask.class_names": json.dumps(list(self.class_names)),
            "ctmask.input": json.dumps(
                {"name": INPUT, "shape": list(self.input_shape()), "range": [0.0, 1.0],
                 "layout": "lung-windowed grayscale; replication and ImageNet mean/std are in the graph"}
            ),
            "ctmask.window": json.dumps({"level": self.window[0], "width": self.window[1]}),
            "ctmask.preprocess": json.dumps(self.preprocessing.to_dict()),
            "ctmask.precision": self.precision,
            "ctmask.opset": str(self.opset),
            "ctmask.checkpoint_sha256": self.checkpoint_sha256,
            "ctmask.checkpoint": self.checkpoint_name,
            "ctmask.head": self.head,
            "ctmask.weights_sha256": self.weights_sha256,
            "ctmask.roi_suppression": self.suppression,
            "ctmask.detector_sha256": self.detector_sha256,
            "ctmask.tolerances": json.dumps({k: t.to_dict() for k, t in self.tolerances.items()}),
        } | ({} if self.precision == "fp32" else {
            "ctmask.source_sha256": self.source_sha256,
        }) | ({"ctmask.int8_target": self.int8_target} if self.precision == "int8" else {})

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: str | Path) -> GraphSpec:
        """Rebuild the spec from ``metadata_props``.

        Raises:
            ModelError: naming ``path`` when the ctmask keys are missing or malformed.
        """
        fmt = meta.get("ctmask.format")
        if fmt is None:
            raise ModelError(
                "ONNX model has no ctmask metadata (key 'ctmask.format' missing)",
                path,
                hint="export the model with `ctmask export CKPT --out model.onnx`",
            )
        if fmt in OLD_FORMATS:
            raise ModelError(f"graph format {fmt!r} was written by an older ctmask ({OLD_FORMATS[fmt]}); this "
                             f"ctmask reads {FORMAT!r} and {UNLABELLED_FORMAT!r}", path,
                             hint="re-export it from its checkpoint: `ctmask export CKPT --out model.onnx` (and "
                                  "remake its FP16 / INT8 graphs and engines from the new file)")
        if fmt not in (FORMAT, UNLABELLED_FORMAT):
            raise ModelError(f"unsupported graph format {fmt!r}; this ctmask reads {FORMAT!r} and "
                             f"{UNLABELLED_FORMAT!r}", path)
        try:
            names = _json_field(meta, "ctmask.class_names", path)
            if not isinstance(names, list):
                raise TypeError(f"ctmask.class_names must be a JSON list of names, got {type(names).__name__}")
            window = _json_field(meta, "ctmask.window", path)
            # Graphs written before the key existed were served uncropped, bilinear.
            prep = Preprocessing.from_dict({**_json_field(meta, "ctmask.preprocess", path, "{}"), "window": window})
            spec = cls(
                preset=meta["ctmask.preset"],
                image_size=int(meta["ctmask.input_size"]),
                n_rois=int(meta["ctmask.n_rois"]),
                class_names=tuple(names),
                window=(float(window["level"]), float(window["width"])),
                precision=meta.get("ctmask.precision", "fp32"),
                opset=int(meta.get("ctmask.opset", OPSET)),
                checkpoint_sha256=meta.get("ctmask.checkpoint_sha256", ""),
                checkpoint_name=meta.get("ctmask.checkpoint", ""),
                version=meta.get("ctmask.version", ""),
                crop=prep.crop,
                resize=prep.resize,
                weights_sha256=meta.get("ctmask.weights_sha256", ""),
                fp32_islands=tuple(sorted(_json_field(meta, "ctmask.fp32_islands", path, "{}"))),
                int8_target=meta.get("ctmask.int8_target", ""),
                source_sha256=meta.get("ctmask.source_sha256", ""),
                head=_head(meta.get("ctmask.head", "paper")),
                labels=fmt == FORMAT,
                suppression=_suppression(meta.get("ctmask.roi_suppression", "nms")),
                detector_sha256=meta.get("ctmask.detector_sha256", ""),
                declared_tolerances=_declared_tolerances(meta.get("ctmask.tolerances")),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ModelError(f"malformed ctmask metadata ({exc.__class__.__name__}: {exc})", path) from None
        problems = _range_problems(spec)
        if problems:
            raise ModelError("ctmask metadata out of range: " + "; ".join(problems), path,
                             hint="re-export the model: `ctmask export CKPT --out model.onnx`")
        return spec

    def shape_problems(self, shapes: Mapping[str, Sequence[int | str | None]]) -> list[str]:
        """Where a graph's own declared dimensions contradict this spec, naming the metadata key.

        Args:
            shapes: tensor name -> the graph's dimensions (ints where static, a name or None
                where symbolic), as onnx and onnxruntime report them; tensors not named are
                not checked, nor are symbolic dimensions (the batch).
        """
        wanted = {INPUT: self.input_shape(), **self.output_shapes()}
        keys = {INPUT: {2: "ctmask.input_size", 3: "ctmask.input_size"},
                "rois": {1: "ctmask.n_rois"}, "boxes": {1: "ctmask.n_rois"}, "labels": {1: "ctmask.n_rois"},
                "logits": {1: "ctmask.class_names"}, "probs": {1: "ctmask.class_names"}}
        problems = []
        for name, want in wanted.items():
            dims = shapes.get(name)
            if dims is None:
                continue
            dims = list(dims)
            what = f"the graph's {'input' if name == INPUT else 'output'} {name} is {_dims_text(dims)}"
            if len(dims) != len(want):
                problems.append(f"{what}, expected {_dims_text(want)}")
                continue
            for i, (d, w) in enumerate(zip(dims, want)):
                if i == 0 or not isinstance(d, int) or d == w:
                    continue
                key = keys.get(name, {}).get(i)
                said = (f"{key} names {w} classes" if key == "ctmask.class_names" else f"{key} says {w}" if key
                        else f"dimension {i} should be {w}")
                problems.append(f"{said}, but {what}")
                break
        return list(dict.fromkeys(problems))

    def check_shapes(self, shapes: Mapping[str, Sequence[int | str | None]], path: str | Path) -> None:
        """Raise :class:`ModelError` naming ``path`` and each field of :meth:`shape_problems`."""
        problems = self.shape_problems(shapes)
        if problems:
            raise ModelError("ctmask metadata disagrees with the graph: " + "; ".join(problems), path,
                             hint="re-export the model (`ctmask export CKPT --out model.onnx`) rather than "
                                  "editing its metadata")
