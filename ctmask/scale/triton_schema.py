"""A Triton Inference Server model repository for ctmask graphs and engines: its layout, its
config schema and the ctmask contract it carries, shared by the writer
(:mod:`ctmask.scale.triton_write`) and the check (:mod:`ctmask.scale.triton_check`).

Layout (Triton's model repository; one folder per model, one numbered folder per version)::

    REPO/
      NAME/                  the ONNX graph: platform onnxruntime_onnx, backend onnxruntime
        config.pbtxt
        labels.txt           the class names, in logit order, attached to the `probs` output
        1/model.onnx
      NAME_trt/              a TensorRT engine: platform tensorrt_plan, backend tensorrt
        config.pbtxt
        labels.txt
        1/model.plan

``config.pbtxt`` is Triton's own ``ModelConfig`` protobuf message (``tritonclient.grpc.
model_config_pb2``), built as a message and written with ``google.protobuf.text_format``, so
it is valid for Triton's schema by construction. Its inputs / outputs come from the graph's
own value_info, cross-checked against the ctmask spec in its metadata (a graph whose declared
shapes disagree with its spec is refused). Only the batch is symbolic: ``max_batch_size`` > 0
and every ``dims`` leaves the batch dimension out. ``labels.txt`` is Triton's classification
extension: a client asking for ``classification`` on ``probs`` gets ``score:index:label``.
The config's ``parameters`` carry the ctmask metadata: the contract (``ctmask.format``,
``ctmask.preset``, ``ctmask.input_size``, ``ctmask.n_rois``, ``ctmask.preprocess``) and, per
version ``N``, ``ctmask.vN.*`` (``sha256`` of its model file, ``precision`` ...; for an
engine also the TensorRT version, GPU, batch profile and plugins).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx

from ctmask.core.errors import ConfigError
from ctmask.core.spec import FORMAT as GRAPH_FORMAT
from ctmask.core.spec import INPUT, UNLABELLED_FORMAT, GraphSpec

try:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
except ModuleNotFoundError as exc:  # tritonclient, protobuf or tritonclient's grpc extra: one fix
    raise ModuleNotFoundError(f"tritonclient[grpc] is not fully installed ({exc})", name="tritonclient") from exc

ONNX_PLATFORM, ONNX_BACKEND, ONNX_FILE = "onnxruntime_onnx", "onnxruntime", "model.onnx"
PLAN_PLATFORM, PLAN_BACKEND, PLAN_FILE = "tensorrt_plan", "tensorrt", "model.plan"
PLATFORMS: dict[str, tuple[str, str]] = {ONNX_PLATFORM: (ONNX_BACKEND, ONNX_FILE),
                                         PLAN_PLATFORM: (PLAN_BACKEND, PLAN_FILE)}
"""Platform -> (backend, the model file Triton loads from a version folder)."""
CONFIG, LABELS = "config.pbtxt", "labels.txt"
ENGINE_SUFFIX = "_trt"
TMP_PREFIX = ".ctmask-tmp-"
DEFAULT_MAX_BATCH = 32
MAX_BATCH = 4096
KINDS = {"gpu": mc.ModelInstanceGroup.KIND_GPU, "cpu": mc.ModelInstanceGroup.KIND_CPU}
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""Model names ctmask writes: a folder name and a URL path segment (``/v2/models/NAME``)."""
CONTRACT_KEYS = ("ctmask.format", "ctmask.preset", "ctmask.input_size", "ctmask.n_rois", "ctmask.preprocess")
VERSION_KEY = re.compile(r"ctmask\.v(\d+)\.(.+)")


def triton_model_name(text: str) -> str:
    """``text`` made a model name ctmask writes: characters outside ``A-Z a-z 0-9 _ . -``
    become ``_``, leading dots and dashes go (a hidden folder would be skipped by people),
    at most 128 characters; ``model`` if nothing is left."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".-")[:128]
    return name or "model"


def check_name(name: str, option: str = "--triton-name") -> str:
    """``name`` itself when it is a model name ctmask writes; ConfigError naming ``option`` otherwise."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"{option} {name!r} is not a Triton model name ctmask writes: 1-128 characters of "
                          "A-Z a-z 0-9 _ . -, not starting with . or -")
    return name



def _dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    """Declared dims of a graph input / output: ints, symbolic names, ``"?"`` for an unknown
    dimension; None when no shape is declared at all."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]


def onnx_io(proto: onnx.ModelProto) -> tuple[dict[str, tuple[int, list | None]], dict[str, tuple[int, list | None]]]:
    """The graph's own inputs (initializers excluded) and outputs: name -> (element type, dims)."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = {v.name: (v.type.tensor_type.elem_type, _dims(v)) for v in proto.graph.input if v.name not in inits}
    outputs = {v.name: (v.type.tensor_type.elem_type, _dims(v)) for v in proto.graph.output}
    return inputs, outputs


def is_batch(dim: int | str) -> bool:
    return isinstance(dim, str)  # a symbolic (named or unknown) dimension


def spec_dims(spec: GraphSpec) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Triton dims (batch left out) of the ctmask contract of ``spec``."""
    return ({INPUT: [int(d) for d in spec.input_shape()[1:]]},
            {k: [int(d) for d in v[1:]] for k, v in spec.output_shapes().items()})


def contract_problems(proto: onnx.ModelProto, spec: GraphSpec) -> list[str]:
    """How the graph's declared inputs / outputs differ from what its ctmask spec says
    (``images [B,1,S,S] -> rois [B,N,5], logits [B,C], probs [B,C], boxes [B,N,4]``, float32,
    only B symbolic)."""
    problems = []
    for kind, got, want in zip(("input", "output"), onnx_io(proto), spec_dims(spec)):
        if set(got) != set(want):
            problems.append(f"graph {kind}s are {sorted(got)}, its spec names {sorted(want)}")
        for name in [n for n in want if n in got]:
            elem, dims = got[name]
            if elem != onnx.TensorProto.FLOAT:
                problems.append(f"{kind} {name} is {onnx.TensorProto.DataType.Name(elem)}, the spec says FLOAT")
            if dims is None:
                problems.append(f"{kind} {name} declares no shape, the spec says [batch, {join_dims(want[name])}]")
            elif not dims or not is_batch(dims[0]) or dims[1:] != want[name]:
                problems.append(f"{kind} {name} declares [{join_dims(dims)}], the spec says "
                                f"[batch, {join_dims(want[name])}]")
    return problems


def join_dims(dims) -> str:
    return ", ".join(str(d) for d in dims)


def contract_params(spec: GraphSpec) -> dict[str, str]:
    return {"ctmask.format": GRAPH_FORMAT if spec.labels else UNLABELLED_FORMAT, "ctmask.preset": spec.preset,
            "ctmask.input_size": str(spec.image_size),
            "ctmask.n_rois": str(spec.n_rois), "ctmask.preprocess": json.dumps(spec.preprocessing.to_dict())}


def version_params(config: mc.ModelConfig) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for key, value in config.parameters.items():
        match = VERSION_KEY.fullmatch(key)
        if match:
            out.setdefault(int(match.group(1)), {})[match.group(2)] = value.string_value
    return out


def version_numbers(model_dir: Path) -> list[int]:
    """Version folders Triton sees: numeric names not starting with 0."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and re.fullmatch(r"[1-9][0-9]*", p.name))


def parse_config(path: Path) -> mc.ModelConfig:
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ConfigError(f"existing model config is unreadable ({exc.__class__.__name__}: {exc})", path,
                          hint="fix or remove that model folder, or choose another --triton-name") from None
