"""Graph identity and contents checks shared by the exporter, calibration and parity (onnx only).

A graph's *content* sha256 hashes what it computes (nodes, weights, inputs and outputs),
not its metadata: the same checkpoint exported from another path, or by another ctmask
version, has the same content hash, so ranges files and precision reports stay valid.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import onnx

from ctmask.core.errors import ModelError
from ctmask.core.spec import INPUT, GraphSpec

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def content_sha256(proto: onnx.ModelProto) -> str:
    """sha256 of ``proto`` without metadata and doc strings (model, graph and every node's).

    The exporter's per-node metadata holds the Python stack trace of each op (source file
    paths and line numbers): the same model exported from another checkout would otherwise
    hash differently.
    """
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.metadata_props[:]
    bare.doc_string = ""
    bare.graph.doc_string = ""
    for node in [*bare.graph.node, *(n for f in bare.functions for n in f.node)]:
        del node.metadata_props[:]
        node.doc_string = ""
    for fn in bare.functions:
        del fn.metadata_props[:]
        fn.doc_string = ""
    return hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()


def load_proto(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file (weights included).

    Raises:
        ModelError: missing or not ONNX (naming the file).
    """
    path = Path(path)
    if path.is_dir():
        raise ModelError("is a folder, not an ONNX file", path)
    if not path.is_file():
        raise ModelError("model file does not exist", path)
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValidationError (external data) ...
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelError(f"not a loadable ONNX model ({exc.__class__.__name__}{': ' + detail if detail else ''})",
                         path) from None


def declared_shapes(proto: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """The graph's inputs' and outputs' declared dimensions: an int where static, the name
    (or None) where symbolic."""
    shapes = {}
    for info in [*proto.graph.input, *proto.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return shapes


def spec_of(proto: onnx.ModelProto, path: str | Path, *, check_shapes: bool = True) -> GraphSpec:
    """The graph's ctmask spec, checked against the graph's own declared shapes (unless
    ``check_shapes`` is False: the Triton writer and checker compare them field by field).

    Raises:
        ModelError: naming ``path`` and the metadata key, when the metadata is missing,
            malformed, out of range or contradicts the graph.
    """
    spec = GraphSpec.from_metadata({p.key: p.value for p in proto.metadata_props}, path)
    if check_shapes:
        spec.check_shapes(declared_shapes(proto), path)
    return spec


def read_spec(path: str | Path) -> GraphSpec:
    """The ctmask spec of an ONNX file, from its metadata (weights are not loaded), checked
    against the graph's declared shapes (:func:`spec_of`).

    Raises:
        ModelError: the file is missing, not ONNX, or not a ctmask graph.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError("model file does not exist", path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError, onnx others
        text = str(exc).strip()
        line = text.splitlines()[0][:300] if text else ""
        raise ModelError(f"not a loadable ONNX model ({f'{exc.__class__.__name__}: {line}'.rstrip(': ')})",
                         path) from None
    return spec_of(proto, path)


def io_problems(proto: onnx.ModelProto, spec: GraphSpec) -> list[str]:
    """How the graph's inputs / outputs differ from ``images [B,1,S,S] -> rois, logits, probs, boxes``
    (``spec.outputs``, in that order, shapes from ``spec``) float32."""
    problems = []
    inputs = {i.name: i for i in proto.graph.input}
    inits = {t.name for t in proto.graph.initializer}
    real_inputs = [n for n in inputs if n not in inits]
    outputs = {o.name: o for o in proto.graph.output}
    if real_inputs != [INPUT]:
        problems.append(f"graph inputs are {real_inputs}, expected [{INPUT!r}]")
    if list(outputs) != list(spec.outputs):
        problems.append(f"graph outputs are {list(outputs)}, expected {list(spec.outputs)}")
    wanted = {INPUT: spec.input_shape(), **spec.output_shapes()}
    for name, shape in wanted.items():
        info = inputs.get(name) or outputs.get(name)
        if info is None:
            continue
        dims = [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
        if info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"{name} has element type {info.type.tensor_type.elem_type}, expected float32")
        bad_batch = not dims or not isinstance(dims[0], str) or dims[0] == ""
        if len(dims) != len(shape) or bad_batch or list(dims[1:]) != list(shape[1:]):
            problems.append(f"{name} has shape {dims}, expected [<batch>, {', '.join(map(str, shape[1:]))}]")
    return problems


def precision_problems(proto: onnx.ModelProto, spec: GraphSpec, reduced_blocks: list[str] | None) -> list[str]:
    """How the graph's contents contradict the precision it declares.

    FP32: no float16 weights, no Q/DQ. FP16: no Q/DQ, and float16 weights when it declares
    reduced blocks. INT8: no float16 weights, and Q/DQ of its target's flavour (tensorrt:
    int8 activations with zero-point 0; cpu: uint8 activations) when it declares reduced
    blocks. ``reduced_blocks``: the graph's ``ctmask.reduced_blocks`` (None if absent).
    """
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    half = sum(1 for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    ops = Counter(n.op_type for n in proto.graph.node)
    qdq = sum(ops[o] for o in QDQ_OPS)
    expects_reduction = bool(reduced_blocks) if reduced_blocks is not None else spec.precision != "fp32"
    problems = []
    if spec.precision in ("fp32", "int8") and half:
        problems.append(f"declares {spec.precision} but holds {half} float16 weight tensor(s)")
    if spec.precision in ("fp32", "fp16") and qdq:
        problems.append(f"declares {spec.precision} but holds {qdq} QuantizeLinear / DequantizeLinear node(s)")
    if spec.precision == "fp16" and expects_reduction and not half:
        problems.append("declares fp16 with reduced blocks but holds no float16 weights")
    if spec.precision == "int8" and expects_reduction:
        if not ops["QuantizeLinear"]:
            problems.append("declares int8 with reduced blocks but holds no QuantizeLinear")
        want = {"tensorrt": np.int8, "cpu": np.uint8}.get(spec.int8_target)
        if want is None:
            problems.append(f"declares int8 for an unknown target {spec.int8_target!r}")
        for node in proto.graph.node:
            if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[2] not in inits:
                continue
            zp = numpy_helper.to_array(inits[node.input[2]])
            if want is not None and zp.dtype != want:
                problems.append(f"QuantizeLinear {node.name!r} quantizes to {zp.dtype}, but the {spec.int8_target} "
                                f"target needs {np.dtype(want).name}")
                break
            if spec.int8_target == "tensorrt" and np.any(zp != 0):
                problems.append(f"QuantizeLinear {node.name!r} has a non-zero zero-point; TensorRT needs 0")
                break
    return problems
