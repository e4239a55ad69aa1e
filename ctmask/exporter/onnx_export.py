"""Classifier checkpoint -> one ONNX graph (detector + ranked RoIs + S), checked and
written atomically.

``images [B, 1, S, S] -> rois [B, N, 5], logits [B, 3], probs [B, 3]`` with only ``B``
symbolic, exported with ``torch.onnx.export(..., dynamo=True)``. The graph spec
(:class:`ctmask.core.spec.GraphSpec`) goes into ``metadata_props``; the runtime reads its
pre-processing from there.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from ctmask.core.errors import CtmaskError
from ctmask.core.fileio import atomic_path, sha256_file
from ctmask.core.spec import BATCH, INPUT, OPSET, OUTPUTS, GraphSpec
from ctmask.exporter.translations import translation_table
from ctmask.training.checkpoint import load_checkpoint
from ctmask.training.evaluate import load_classifier
from ctmask.training.model import CovidCTMaskNet


class ExportError(CtmaskError):
    """The exported graph does not meet the graph contract."""


class GraphModule(nn.Module):
    """The exported contract: ``images -> (rois, logits, probs)``."""

    def __init__(self, model: CovidCTMaskNet):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rois, logits = self.model(images)
        return rois, logits, torch.softmax(logits, -1)


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
            "metadata": self.spec.metadata(),
            "seconds": round(self.seconds, 2),
            "nodes": self.n_nodes,
            "op_types": self.op_types,
            "size_bytes": self.size_bytes,
        }


def trace_to_onnx(model: CovidCTMaskNet, opset: int = OPSET, example_batch: int = 2) -> onnx.ModelProto:
    """Export ``model`` (eval mode) with the dynamo exporter; return the model proto.

    The example batch has ``example_batch`` (>= 2) random slices so the batch axis is
    traced as symbolic.
    """
    size = model.preset.image_size
    example = torch.rand(max(2, example_batch), 1, size, size, generator=torch.Generator().manual_seed(0))
    # The exporter narrates its steps on stdout and warns about internals; keep the
    # user's terminal for ctmask's own messages.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            GraphModule(model.eval()),
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
    problems = []

    def dims(value_info) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name: o for o in proto.graph.output}
    if list(inputs) != [INPUT]:
        problems.append(f"graph inputs are {list(inputs)}, expected [{INPUT!r}]")
    if list(outputs) != list(OUTPUTS):
        problems.append(f"graph outputs are {list(outputs)}, expected {list(OUTPUTS)}")
    wanted = {INPUT: spec.input_shape(), **spec.output_shapes()}
    for name, shape in wanted.items():
        info = inputs.get(name) or outputs.get(name)
        if info is None:
            continue
        got = dims(info)
        if info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"{name} has element type {info.type.tensor_type.elem_type}, expected float32")
        if len(got) != len(shape) or not isinstance(got[0], str) or got[0] == "" or list(got[1:]) != list(shape[1:]):
            problems.append(f"{name} has shape {got}, expected [<batch>, {', '.join(map(str, shape[1:]))}]")
    ops = {n.op_type for n in proto.graph.node}
    if "NonZero" in ops:
        problems.append("graph contains NonZero: a data-dependent size outside NMS")
    return problems


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = OPSET) -> ExportResult:
    """Export a classifier checkpoint to one verified ONNX file.

    Args:
        checkpoint: classifier checkpoint written by ``ctmask train-cls``.
        out: ONNX file to write (single file, weights inside).
        opset: ONNX opset (>= 18).

    Raises:
        CheckpointError: the checkpoint is missing, unreadable or not a classifier.
        ExportError: the traced graph breaks the contract (all problems listed) or fails
            ``onnx.checker.check_model(full_check=True)``. Nothing is written then.
    """
    if opset < OPSET:
        raise ExportError(f"opset {opset} is too old: RoiAlign / NMS semantics need opset >= {OPSET}")
    t0 = time.perf_counter()
    ck = load_checkpoint(checkpoint, kind="classifier")
    model = load_classifier(ck)
    spec = GraphSpec.for_preset(ck.preset, opset=opset, checkpoint_sha256=sha256_file(checkpoint),
                                checkpoint_name=str(Path(checkpoint).resolve()))
    proto = trace_to_onnx(model, opset)
    proto.doc_string = f"COVID-CT-Mask-Net ({spec.preset} preset) exported by ctmask {spec.version}"
    del proto.metadata_props[:]
    for key, value in spec.metadata().items():
        proto.metadata_props.add(key=key, value=value)
    problems = graph_problems(proto, spec)
    if problems:
        raise ExportError("exported graph breaks the contract:\n  - " + "\n  - ".join(problems), out)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the graph: {str(exc).splitlines()[0]}", out) from None
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
