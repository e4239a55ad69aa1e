"""Classifier checkpoint -> one ONNX graph (detector + ranked RoIs + S), checked and
written atomically.

``images [B, 1, S, S] -> rois [B, N, 5], logits [B, 3], probs [B, 3], boxes [B, N, 4], labels [B, N]`` with
only ``B`` symbolic, exported with ``torch.onnx.export(..., dynamo=True)``. The graph spec
(:class:`ctmask.core.spec.GraphSpec`) goes into ``metadata_props``; the runtime reads its
pre-processing from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from ctmask.core.errors import ExportError
from ctmask.core.fileio import atomic_path, sha256_file
from ctmask.core.graphs import io_problems
from ctmask.core.spec import BATCH, INPUT, OPSET, OUTPUTS, GraphSpec
from ctmask.exporter.translations import translation_table
from ctmask.training.checkpoint import load_checkpoint
from ctmask.training.evaluate import load_classifier
from ctmask.training.model import CovidCTMaskNet
from ctmask.training.roi_cache import detector_digest

MAX_OPSET = onnx.defs.onnx_opset_version()
"""Newest default-domain opset the installed ``onnx`` package knows (and can check)."""


def default_opset(proto: onnx.ModelProto) -> int:
    """The default-domain (``ai.onnx``) opset a model proto really imports (0 if none)."""
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


class GraphModule(nn.Module):
    """The exported contract: ``images -> (rois, logits, probs, boxes, labels)`` (:data:`OUTPUTS` order).

    ``boxes`` are the ranked rows' decoded boxes ``(x1, y1, x2, y2)`` in input pixels, zeros
    on padding rows, ``labels`` each row's lesion class id (1 GGO, 2 consolidation, 0 padding);
    both computed inside ``model.ranker`` (the FP32 ``ranking`` block).
    """

    def __init__(self, model: CovidCTMaskNet):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        rois, logits, boxes, labels = self.model(images, with_boxes=True, with_labels=True)
        return rois, logits, torch.softmax(logits, -1), boxes, labels


@dataclass
class ExportResult:
    path: Path
    spec: GraphSpec
    seconds: float
    n_nodes: int
    op_types: list[str]
    size_bytes: int

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "opset": self.spec.opset,
            "metadata": self.spec.metadata(),
            "seconds": round(self.seconds, 2),
            "nodes": self.n_nodes,
            "op_types": self.op_types,
            "size_bytes": self.size_bytes,
        }


def trace_to_onnx(model: CovidCTMaskNet, opset: int = OPSET, example_batch: int = 2,
                  graph: nn.Module | None = None) -> onnx.ModelProto:
    """Export ``model`` (eval mode) with the dynamo exporter; return the model proto.

    The example batch has ``example_batch`` (>= 2) random slices so the batch axis is
    traced as symbolic. ``graph`` is the module traced (default ``GraphModule(model)``;
    parity's tests trace deliberately wrong wrappers of ``model`` through it).
    """
    size = model.preset.image_size
    example = torch.rand(max(2, example_batch), 1, size, size, generator=torch.Generator().manual_seed(0))
    # The exporter narrates its steps on stdout and warns about internals; keep the
    # user's terminal for ctmask's own messages.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph if graph is not None else GraphModule(model.eval()),
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={INPUT: {0: BATCH}},
            custom_translation_table=translation_table(),
            external_data=False,
            verbose=False,
        )
    return program.model_proto


def graph_problems(proto: onnx.ModelProto, spec: GraphSpec) -> list[str]:
    """Every way ``proto`` breaks the graph contract of ``spec`` (empty if none)."""
    problems = io_problems(proto, spec)
    if "NonZero" in {n.op_type for n in proto.graph.node}:
        problems.append("graph contains NonZero: a data-dependent size outside NMS")
    return problems


def onnxruntime_problem(proto: onnx.ModelProto) -> str | None:
    """Why onnxruntime's CPU provider cannot load ``proto`` (its message), or ``None`` if it can.

    ``onnx.checker`` knows every opset the ``onnx`` package defines, onnxruntime only the
    kernels it implements (e.g. no ``RoiAlign(22)``): a graph that passes the checker may
    still not run.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # errors come back as the exception, not on stderr
    try:
        ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (Fail, NotImplemented, InvalidGraph ...)
        return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return None


_TRACES: OrderedDict[tuple[str, int], bytes] = OrderedDict()
_TRACES_LOCK = threading.Lock()
TRACE_CACHE_BYTES = 768 << 20
"""Most bytes of serialized traces :func:`remember_trace` keeps (the oldest go first)."""


def cached_trace(key: str, opset: int) -> onnx.ModelProto | None:
    """A fresh copy of this process's earlier verified trace of the same model (:func:`trace_key`) at ``opset``.

    Tracing is deterministic (fixed example input) and costs seconds to minutes; exporting one
    checkpoint at several precisions (``precision-report``, then ``export --precision fp16`` and
    ``int8`` from Python) traces the FP32 graph once. A changed checkpoint has another key and is
    traced anew; each caller gets its own copy to edit.
    """
    with _TRACES_LOCK:
        data = _TRACES.get((key, opset))
        if data is None:
            return None
        _TRACES.move_to_end((key, opset))
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    return proto


def trace_key(ck) -> str:
    """What a trace is made from, read from the checkpoint as loaded (not the file again, which may
    have been replaced since): the weights' digest and the preset the model is built from."""
    preset = json.dumps(ck.preset.to_dict(), sort_keys=True).encode()
    return f"{ck.weights_sha256}:{hashlib.sha256(preset).hexdigest()}"


def remember_trace(key: str, opset: int, proto: onnx.ModelProto) -> None:
    """Keep a trace that passed :func:`verify_graph` for :func:`cached_trace` (oldest dropped past the limit)."""
    data = proto.SerializeToString()
    with _TRACES_LOCK:
        _TRACES[(key, opset)] = data
        while sum(map(len, _TRACES.values())) > TRACE_CACHE_BYTES:
            _TRACES.popitem(last=False)


def trace_checked(checkpoint: str | Path, opset: int = OPSET) -> tuple[onnx.ModelProto, GraphSpec]:
    """The FP32 graph of a classifier checkpoint, with its metadata, checked as :func:`export_onnx` says.

    Raises:
        CheckpointError, ExportError: as :func:`export_onnx`.
    """
    if opset < OPSET:
        raise ExportError(f"opset {opset} is too old: RoiAlign / NMS semantics need opset >= {OPSET}")
    if opset > MAX_OPSET:
        raise ExportError(f"opset {opset} does not exist yet: the installed onnx {onnx.__version__} knows opsets up "
                          f"to {MAX_OPSET}", hint=f"pass --opset between {OPSET} and {MAX_OPSET}")
    ck = load_checkpoint(checkpoint, kind="classifier")
    checkpoint_sha256 = sha256_file(checkpoint)
    cached = cached_trace(trace_key(ck), opset)
    proto = cached if cached is not None else trace_to_onnx(load_classifier(ck), opset)
    real = default_opset(proto)
    if real != opset:
        # torch.onnx exports at its own opset and converts; when the conversion fails it
        # keeps the unconverted graph without an error.
        raise ExportError(f"torch.onnx.export could not produce opset {opset} (the graph came out at opset {real}); "
                          "nothing was written", hint=f"export at opset {real}")
    spec = GraphSpec.for_preset(ck.preset, preprocessing=ck.preprocessing, opset=real,
                                checkpoint_sha256=checkpoint_sha256,
                                checkpoint_name=str(Path(checkpoint).resolve()), weights_sha256=ck.weights_sha256,
                                detector_sha256=detector_digest(ck.model, ck.preset))
    set_metadata(proto, spec)
    verify_graph(proto, spec)
    if cached is None:
        remember_trace(trace_key(ck), opset, proto)
    return proto, spec


def set_metadata(proto: onnx.ModelProto, spec: GraphSpec, extra: dict[str, str] | None = None) -> None:
    """Replace the graph's ``metadata_props`` with ``spec``'s (plus ``extra``) and its doc string."""
    proto.doc_string = f"COVID-CT-Mask-Net ({spec.preset} preset, {spec.precision}) exported by ctmask {spec.version}"
    del proto.metadata_props[:]
    for key, value in {**spec.metadata(), **(extra or {})}.items():
        proto.metadata_props.add(key=key, value=value)


def verify_graph(proto: onnx.ModelProto, spec: GraphSpec, out: str | Path | None = None) -> None:
    """Raise :class:`ExportError` unless ``proto`` keeps the contract, passes the full
    checker and loads in an onnxruntime CPU session."""
    problems = graph_problems(proto, spec)
    if problems:
        raise ExportError("exported graph breaks the contract:\n  - " + "\n  - ".join(problems), out)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the graph: {str(exc).splitlines()[0]}", out) from None
    problem = onnxruntime_problem(proto)
    if problem:
        import onnxruntime

        raise ExportError(f"onnxruntime {onnxruntime.__version__} cannot run the opset {spec.opset} "
                          f"{spec.precision} graph ({problem}); nothing was written", out,
                          hint=f"export at an opset onnxruntime implements, e.g. --opset {OPSET} (the default)")


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = OPSET) -> ExportResult:
    """Export a classifier checkpoint to one verified FP32 ONNX file.

    The graph's metadata carries the checkpoint's weights digest and its pre-processing
    (crop, resize, window), and the opset reported is the one the file really imports.
    Reduced precision: :func:`ctmask.exporter.reduced.export_reduced`.

    Args:
        checkpoint: classifier checkpoint written by ``ctmask train-cls``.
        out: ONNX file to write (single file, weights inside).
        opset: ONNX opset, ``OPSET`` (18) .. :data:`MAX_OPSET`.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, corrupt or not a classifier.
        ExportError: the opset is out of range or the exporter could not produce it; the
            traced graph breaks the contract (all problems listed), fails
            ``onnx.checker.check_model(full_check=True)``, or cannot be loaded by an
            onnxruntime CPU session (an operator version it does not implement: the error
            names the opset and onnxruntime's message). Nothing is written then.
    """
    t0 = time.perf_counter()
    proto, spec = trace_checked(checkpoint, opset)
    return write_graph(proto, spec, out, t0)


def write_graph(proto: onnx.ModelProto, spec: GraphSpec, out: str | Path, t0: float) -> ExportResult:
    """Write ``proto`` atomically and describe it."""
    out = Path(out)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return ExportResult(
        path=out,
        spec=spec,
        seconds=time.perf_counter() - t0,
        n_nodes=len(proto.graph.node),
        op_types=sorted({n.op_type for n in proto.graph.node}),
        size_bytes=out.stat().st_size,
    )
