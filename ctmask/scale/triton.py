"""A Triton Inference Server model repository for ctmask graphs and engines, and its check.

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

Everything is written atomically: a new model folder is assembled in a temporary sibling
folder (``.ctmask-tmp-*``) and renamed into place; a new version of an existing model is
assembled inside the model folder (Triton ignores folders whose name is not a number) and
renamed to its number, then the config is replaced atomically. A version folder is never
overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ctmask.core.errors import ConfigError, CtmaskError, DataError, Finding, ModelError
from ctmask.core.fileio import fsync_dir, fsync_file, sha256_file, write_text_atomic
from ctmask.core.spec import FORMAT as GRAPH_FORMAT
from ctmask.core.spec import INPUT, OUTPUTS, GraphSpec

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

ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.BFLOAT16: mc.TYPE_BF16, onnx.TensorProto.DOUBLE: mc.TYPE_FP64,
    onnx.TensorProto.INT8: mc.TYPE_INT8, onnx.TensorProto.INT16: mc.TYPE_INT16,
    onnx.TensorProto.INT32: mc.TYPE_INT32, onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.UINT8: mc.TYPE_UINT8, onnx.TensorProto.UINT16: mc.TYPE_UINT16,
    onnx.TensorProto.UINT32: mc.TYPE_UINT32, onnx.TensorProto.UINT64: mc.TYPE_UINT64,
    onnx.TensorProto.BOOL: mc.TYPE_BOOL, onnx.TensorProto.STRING: mc.TYPE_STRING,
}
"""ONNX element type -> Triton data type (what onnxruntime's backend maps them to)."""

PLUGIN_NOTE = ("the plan calls the ROIAlign_TRT plugin of TensorRT's standard plugin library (libnvinfer_plugin), "
               "which Triton's TensorRT backend registers when it starts; serve it with the TensorRT release that "
               "built it (ctmask.vN.tensorrt_version)")


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


# ---------------------------------------------------------------- what goes into a model folder


@dataclass
class _Model:
    """One model to write: its file, its contract and the per-version metadata."""

    name: str
    platform: str
    source: Path
    sha256: str
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    class_names: tuple[str, ...]
    contract: dict[str, str]
    version_meta: dict[str, str]
    profile_max: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        return PLATFORMS[self.platform][1]


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


def _is_batch(dim: int | str) -> bool:
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
                problems.append(f"{kind} {name} declares no shape, the spec says [batch, {_join(want[name])}]")
            elif not dims or not _is_batch(dims[0]) or dims[1:] != want[name]:
                problems.append(f"{kind} {name} declares [{_join(dims)}], the spec says [batch, {_join(want[name])}]")
    return problems


def _join(dims) -> str:
    return ", ".join(str(d) for d in dims)


def _load_graph(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ModelError("graph file does not exist", path)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError ...
        raise ModelError(f"not a loadable ONNX model ({exc.__class__.__name__})", path) from None


def _graph_model(name: str, graph: Path) -> _Model:
    """The ONNX model of ``graph``, its declared shapes checked against its spec."""
    proto = _load_graph(graph)
    spec = GraphSpec.from_metadata({p.key: p.value for p in proto.metadata_props}, graph)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ModelError("graph keeps weights in external data files; Triton's model.onnx is copied alone", graph,
                         hint="re-export it as one file (ctmask export writes one)")
    problems = contract_problems(proto, spec)
    if problems:
        raise ModelError("graph's declared shapes disagree with its ctmask spec; not packaged:\n  - "
                         + "\n  - ".join(problems), graph)
    inputs, outputs = onnx_io(proto)
    order = [INPUT, *OUTPUTS]
    to_triton = {n: [-1 if _is_batch(d) else int(d) for d in dims[1:]]  # type: ignore[index]
                 for n, (_, dims) in {**inputs, **outputs}.items()}
    return _Model(
        name=name, platform=ONNX_PLATFORM, source=graph, sha256=sha256_file(graph),
        inputs={n: to_triton[n] for n in order if n in inputs},
        outputs={n: to_triton[n] for n in order if n in outputs},
        class_names=spec.class_names, contract=_contract(spec),
        version_meta={"precision": spec.precision, "ctmask_version": spec.version,
                      "weights_sha256": spec.weights_sha256, "source": graph.name},
    )


def _contract(spec: GraphSpec) -> dict[str, str]:
    return {"ctmask.format": GRAPH_FORMAT, "ctmask.preset": spec.preset, "ctmask.input_size": str(spec.image_size),
            "ctmask.n_rois": str(spec.n_rois), "ctmask.preprocess": json.dumps(spec.preprocessing.to_dict())}


def _engine_model(name: str, engine: Path) -> _Model:
    """The tensorrt_plan model of ``engine``: its sidecar read and its plan checked against it."""
    from ctmask.trt.engine import check_plan, read_sidecar

    info = read_sidecar(engine)
    check_plan(info, engine.read_bytes(), engine)
    spec = info.spec
    if info.profile.min > 1:
        raise ConfigError(f"the engine's batch profile starts at {info.profile.min}: Triton's dynamic batcher sends "
                          "batches from 1 up", engine,
                          hint=f"rebuild it with --batch 1,{info.profile.opt},{info.profile.max}")
    inputs, outputs = spec_dims(spec)
    p = info.profile
    return _Model(
        name=name, platform=PLAN_PLATFORM, source=engine, sha256=info.plan_sha256, inputs=inputs,
        outputs={n: outputs[n] for n in OUTPUTS}, class_names=spec.class_names, contract=_contract(spec),
        version_meta={"precision": spec.precision, "ctmask_version": info.ctmask_version,
                      "weights_sha256": spec.weights_sha256, "source": engine.name,
                      "tensorrt_version": info.tensorrt_version, "gpu": info.gpu_name,
                      "compute_capability": info.compute_capability, "profile": f"{p.min},{p.opt},{p.max}",
                      "onnx_sha256": info.onnx_sha256, "plugins": "; ".join(info.plugins)},
        profile_max=p.max, notes=[PLUGIN_NOTE],
    )


def _build_config(m: _Model, max_batch: int, preferred: list[int], delay_us: int, instances: int, kind: str,
                  params: dict[str, str]) -> mc.ModelConfig:
    config = mc.ModelConfig(name=m.name, platform=m.platform, backend=PLATFORMS[m.platform][0],
                            max_batch_size=max_batch)
    config.version_policy.latest.num_versions = 1
    for name, dims in m.inputs.items():
        config.input.add(name=name, data_type=mc.TYPE_FP32, dims=dims)
    for name, dims in m.outputs.items():
        out = config.output.add(name=name, data_type=mc.TYPE_FP32, dims=dims)
        if name == "probs":
            out.label_filename = LABELS
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = delay_us
    config.instance_group.add(count=instances, kind=KINDS[kind])
    for key, value in sorted(params.items()):
        config.parameters[key].string_value = value
    return config


def _render(config: mc.ModelConfig, notes: list[str]) -> str:
    head = ["# Triton model configuration written by ctmask (ctmask check-triton REPO checks it)."]
    head += [f"# Note: {n}." for n in notes]
    return "\n".join(head) + "\n" + text_format.MessageToString(config)


def _labels(class_names: tuple[str, ...]) -> str:
    return "".join(f"{c}\n" for c in class_names)


def _version_params(config: mc.ModelConfig) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for key, value in config.parameters.items():
        match = VERSION_KEY.fullmatch(key)
        if match:
            out.setdefault(int(match.group(1)), {})[match.group(2)] = value.string_value
    return out


def _versions(model_dir: Path) -> list[int]:
    """Version folders Triton sees: numeric names not starting with 0."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and re.fullmatch(r"[1-9][0-9]*", p.name))


def _parse_config(path: Path) -> mc.ModelConfig:
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ConfigError(f"existing model config is unreadable ({exc.__class__.__name__}: {exc})", path,
                          hint="fix or remove that model folder, or choose another --triton-name") from None


# ---------------------------------------------------------------- planning and writing


@dataclass
class _Plan:
    model: _Model
    folder: Path
    version: int
    action: str  # "new" (a new model folder), "add" (a version into an existing folder), "unchanged"
    config_text: str
    labels_text: str
    max_batch: int
    preferred: list[int]

    def summary(self) -> dict:
        return {"model": self.model.name, "platform": self.model.platform, "version": self.version,
                "status": "unchanged" if self.action == "unchanged" else "written",
                "folder": str(self.folder), "file": str(self.folder / str(self.version) / self.model.file_name),
                "config": str(self.folder / CONFIG), "sha256": self.model.sha256, "max_batch_size": self.max_batch,
                "preferred_batch_size": self.preferred, "notes": list(self.model.notes)}


def _differences(a: mc.ModelConfig, b: mc.ModelConfig, fields: tuple[str, ...]) -> list[str]:
    return [f for f in fields if getattr(a, f) != getattr(b, f)]


def _plan(repo: Path, m: _Model, max_batch: int | None, instances: int, kind: str, delay_us: int,
          version: int | None) -> _Plan:
    """What writing ``m`` into ``repo`` does; ConfigError (nothing written) when it is refused."""
    folder = repo / m.name
    labels = _labels(m.class_names)
    existing: mc.ModelConfig | None = None
    old_versions: list[int] = []
    old_params: dict[int, dict[str, str]] = {}
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError("exists and is not a model folder", folder)
        if not (folder / CONFIG).is_file():
            raise ConfigError(f"exists without a {CONFIG}: not a model folder ctmask wrote", folder,
                              hint="remove it or choose another --triton-name")
        existing = _parse_config(folder / CONFIG)
        old_versions = _versions(folder)
        old_params = {v: p for v, p in _version_params(existing).items() if v in old_versions}
    # An engine's batch limit is its profile's MAX, for every engine version the config serves.
    limits: dict[int, int] = {0: m.profile_max} if m.profile_max is not None else {}
    if m.platform == PLAN_PLATFORM:
        limits.update({v: int(p["profile"].split(",")[-1]) for v, p in old_params.items() if "profile" in p})
    limit = min(limits.values()) if limits else None
    if max_batch is None:
        max_batch = limit if limit is not None else DEFAULT_MAX_BATCH
    elif limit is not None and max_batch > limit:
        whose = min(v for v, lim in limits.items() if lim == limit)
        raise ConfigError(f"--triton-max-batch {max_batch} is above the batch profile's MAX {limit} of "
                          + ("the engine" if whose == 0 else f"version {whose}") + ": TensorRT refuses larger "
                          "batches; nothing was written", m.source if whose == 0 else folder / str(whose),
                          hint=f"pass --triton-max-batch {limit} or less, or rebuild the engine with a larger --batch")
    opt = int(m.version_meta["profile"].split(",")[1]) if "profile" in m.version_meta else max_batch
    preferred = [min(opt, max_batch)]

    def render(v: int) -> str:
        params = dict(m.contract)
        for k, p in {**old_params, v: m.version_meta | {"sha256": m.sha256}}.items():
            params.update({f"ctmask.v{k}.{key}": value for key, value in p.items()})
        return _render(_build_config(m, max_batch, preferred, delay_us, instances, kind, params), m.notes)

    def plan(v: int, action: str) -> _Plan:
        return _Plan(m, folder, v, action, render(v), labels, max_batch, preferred)

    if existing is None:
        return plan(version or 1, "new")
    candidate = text_format.Parse(render(version or 1), mc.ModelConfig())
    diff = _differences(existing, candidate, ("platform", "backend", "input", "output"))
    diff += [k for k in CONTRACT_KEYS if k not in existing.parameters
             or existing.parameters[k].string_value != m.contract[k]]
    if not (folder / LABELS).is_file() or (folder / LABELS).read_bytes() != labels.encode("utf-8"):
        diff.append(LABELS)
    if diff:
        raise ConfigError(f"holds a model of another contract ({', '.join(diff)} differ): the versions of one "
                          "Triton model share one config; nothing was written", folder,
                          hint="choose another --triton-name (or remove that model folder)")
    found = version is None
    if version is None:
        same = [v for v in old_versions if sha256_file(folder / str(v) / m.file_name) == m.sha256]
        if not same:
            return plan(max(old_versions, default=0) + 1, "add")
        version = same[-1]
    elif version not in old_versions:
        return plan(version, "add")
    # ``version`` exists: accepted only when nothing would change.
    target = folder / str(version) / m.file_name
    new = plan(version, "unchanged")
    same_file = target.is_file() and sha256_file(target) == m.sha256
    fields = []
    if new.config_text != (folder / CONFIG).read_text(encoding="utf-8"):
        fields = _differences(existing, text_format.Parse(new.config_text, mc.ModelConfig()), _SERVING) or ["text"]
    if same_file and not fields:
        return new
    if found:
        raise ConfigError(f"version {version} holds this model already, served with another config ("
                          f"{', '.join(fields)} differ); nothing was written", folder / CONFIG,
                          hint="a model's versions share one config: to serve it with other options, remove "
                               f"{folder} first or choose another --triton-name")
    what = ([] if same_file else ["its model file differs"]) + ([f"the config differs ({', '.join(fields)})"]
                                                                 if fields else [])
    raise ConfigError(f"version {version} exists and {' and '.join(what)}: a version folder is never overwritten; "
                      "nothing was written", folder / str(version),
                      hint="leave the version out (the next free one is taken), choose another --triton-name, or "
                           "remove that version folder")


_SERVING = ("max_batch_size", "dynamic_batching", "instance_group", "version_policy", "parameters")


def _chmod_dir(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)  # mkdtemp makes 0700: the server may run as another user


def _fill_version(folder: Path, m: _Model) -> None:
    """Copy the model file into ``folder`` (made here), fsync it and check the copy's sha256."""
    folder.mkdir()
    target = folder / m.file_name
    shutil.copyfile(m.source, target)
    fsync_file(target)
    if sha256_file(target) != m.sha256:
        raise DataError("changed while it was being copied into the repository", m.source)
    fsync_dir(folder)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    fsync_file(path)


def _commit(repo: Path, plan: _Plan) -> None:
    m, folder = plan.model, plan.folder
    if plan.action == "unchanged":
        return
    if plan.action == "new":
        repo.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{m.name}-", dir=repo))
        try:
            _chmod_dir(tmp)
            _write_text(tmp / CONFIG, plan.config_text)
            _write_text(tmp / LABELS, plan.labels_text)
            _fill_version(tmp / str(plan.version), m)
            fsync_dir(tmp)
            if folder.exists():  # appeared meanwhile; os.rename would replace an empty folder
                raise ConfigError("appeared while the model was being written; nothing was written", folder)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(repo)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{plan.version}-", dir=folder))
    version_dir = folder / str(plan.version)
    try:
        _fill_version(tmp / "v", m)
        if version_dir.exists():
            raise ConfigError("appeared while the version was being written; nothing was written", version_dir)
        os.rename(tmp / "v", version_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        fsync_dir(folder)
        write_text_atomic(folder / CONFIG, plan.config_text)
    except BaseException:
        shutil.rmtree(version_dir, ignore_errors=True)
        raise


def write_triton_repo(repo: Path, name: str, graph: Path | None, engine: Path | None, *, max_batch: int | None,
                      instances: int, kind: str, max_queue_delay_us: int, version: int | None) -> dict:
    """Write ``graph`` as model ``name`` and ``engine`` as model ``name_trt`` into the Triton
    model repository ``repo`` (created if missing).

    Args:
        max_batch: ``max_batch_size`` (None: 32 for the graph, the profile's MAX for an engine,
            which it may not exceed).
        instances: ``instance_group`` count; ``kind``: ``gpu`` or ``cpu`` (an engine: gpu only).
        max_queue_delay_us: the dynamic batcher's queue delay.
        version: the version folder; None: 1 for a new model, the version already holding
            this very file (if its config is the same, nothing is written), else the next free
            number. An existing version folder is never overwritten.

    Returns:
        ``{"repo": ..., "models": [summary per model]}``.

    Raises:
        ConfigError: bad options, an existing version with other content, a model folder of
            another contract, ... (nothing written); ModelError / EngineError: an unusable
            graph or engine (nothing written).
    """
    repo = Path(repo)
    if graph is None and engine is None:
        raise ConfigError("nothing to package: give a graph or an engine")
    check_name(name)
    if kind not in KINDS:
        raise ConfigError(f"--triton-kind must be gpu or cpu, got {kind!r}")
    if engine is not None and kind != "gpu":
        raise ConfigError("--triton-kind cpu: a TensorRT engine runs on a GPU only (KIND_GPU)")
    if max_batch is not None and not 1 <= max_batch <= MAX_BATCH:
        raise ConfigError(f"--triton-max-batch must be in 1..{MAX_BATCH}, got {max_batch}")
    if not 1 <= instances <= 1024:
        raise ConfigError(f"--triton-instances must be in 1..1024, got {instances}")
    if not 0 <= max_queue_delay_us <= 60_000_000:
        raise ConfigError(f"--triton-delay-us must be in 0..60000000 (a minute), got {max_queue_delay_us}")
    if version is not None and version < 1:
        raise ConfigError(f"version must be >= 1 (Triton ignores version folders named 0...), got {version}")
    if repo.exists() and not repo.is_dir():
        raise ConfigError("--triton-repo is a file, not a folder", repo)
    models = []
    if graph is not None:
        models.append(_graph_model(name, Path(graph)))
    if engine is not None:
        models.append(_engine_model(name + ENGINE_SUFFIX, Path(engine)))
    if len(models) == 2 and models[0].contract != models[1].contract:
        raise ConfigError(f"the engine {engine} was built from a graph of another contract than {graph}", engine)
    plans = [_plan(repo, m, max_batch, instances, kind, max_queue_delay_us, version) for m in models]
    for plan in plans:  # every refusal above came before anything was written
        _commit(repo, plan)
    return {"repo": str(repo), "models": [p.summary() for p in plans]}


def check_destination(repo: Path, names: list[str]) -> None:
    """Refuse, before a long export, a repository that cannot take models ``names``: a file
    in its place, or a folder of that name without a readable config."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ConfigError("--triton-repo is a file, not a folder", repo)
    for name in names:
        folder = repo / name
        if folder.exists():
            if not (folder / CONFIG).is_file():
                raise ConfigError(f"exists without a {CONFIG}: not a model folder ctmask wrote", folder,
                                  hint="remove it or choose another --triton-name")
            _parse_config(folder / CONFIG)


# ---------------------------------------------------------------- the check


def _reason(exc: OSError) -> str:
    return f"{exc.__class__.__name__}: {exc.strerror or exc}"


def _kind(path: Path) -> tuple[str, str]:
    """What ``path`` is, symbolic links followed: ``file``, ``dir``, ``other`` (a FIFO, a device ...),
    ``missing`` or ``bad`` (a dangling or looping link, a permission error), and that in words
    (for a place where a file belongs)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        try:
            dangling = path.is_symlink()
        except OSError:
            dangling = False
        if dangling:
            return "bad", "is a symbolic link to nothing (its target does not exist)"
        return "missing", "does not exist"
    except OSError as exc:  # ELOOP (a symbolic link loop), EACCES, ENAMETOOLONG ...
        return "bad", f"cannot be resolved ({_reason(exc)})"
    if stat.S_ISREG(mode):
        return "file", "is a file"
    if stat.S_ISDIR(mode):
        return "dir", "is a directory, not a file"
    return "other", "is not a regular file (a FIFO, socket or device)"


def _outside(path: Path, repo: Path) -> str | None:
    """Where ``path`` really is when a symbolic link on its way takes it out of the model repository
    ``repo`` (None when it stays inside, or cannot be resolved: :func:`_kind` says so)."""
    try:
        real, root = path.resolve(strict=True), repo.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return None if real.is_relative_to(root) else str(real)


def _check_inside(path: Path, repo: Path, add) -> None:
    """A finding when ``path`` resolves outside ``repo``: a container mounting the repository alone
    cannot follow the link."""
    real = _outside(path, repo)
    if real is not None:
        add(f"is a symbolic link to {real}, outside the model repository: a Triton container that mounts the "
            "repository cannot read it; copy the file into the repository", path)


def _escapes(name: str) -> bool:
    """A relative file name that leaves its folder: absolute, or with a ``..`` component."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or bool(re.match(r"[A-Za-z]:", name))


def _is_path(name: str) -> bool:
    """Not a plain file name of one folder (``/``, ``\\``, ``.`` or ``..``)."""
    return "/" in name or "\\" in name or name in (".", "..")


def _read_text(path: Path, add) -> str | None:
    """``path`` read as UTF-8 text; None, with a finding naming it, when it cannot be read or is
    not UTF-8 (the finding gives the line of the first bad byte)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        add(f"unreadable ({_reason(exc)})", path)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        add(f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: {exc.reason}); write it as "
            "UTF-8", path, data.count(b"\n", 0, exc.start) + 1)
        return None


def _entries(folder: Path) -> list[Path]:
    """``folder``'s entries, sorted (OSError when it cannot be listed)."""
    return sorted(folder.iterdir())


def model_folders(repo: Path) -> list[Path]:
    """The folders Triton would load as models (hidden folders left out; none when ``repo``
    cannot be listed)."""
    try:
        entries = _entries(Path(repo))
    except OSError:
        return []
    return [p for p in entries if not p.name.startswith(".") and _kind(p)[0] == "dir"]


def check_triton_repo(repo: Path) -> list[Finding]:
    """Every problem of the model repository ``repo`` (empty when none).

    Each ``config.pbtxt`` is parsed into Triton's ``ModelConfig`` (a parse error names the file
    and line); a version folder must hold the file its platform loads; for ONNX models the
    config's input / output names, data types and dims must match the graph's own declared
    inputs / outputs (read with ``onnx``) and its ctmask spec, and the graph must keep no
    weights in external data files; ``max_batch_size`` >= 1 and the preferred batch sizes at
    most that; the recorded sha256 of each version's file, the labels and, for engines, the
    batch profile are checked too. Each input / output is listed once, without ``reshape``;
    ``default_model_filename`` (other than the platform's file) and ``cc_model_filenames``,
    which ctmask never writes, are findings; a ``model_warmup`` must fit ``max_batch_size`` and
    the model's inputs. A file that cannot be read, is not UTF-8 text, is a directory or a
    symbolic link loop is a finding naming it, never an exception; so is a config, labels or
    model file that a symbolic link takes outside ``repo`` (a container that mounts the
    repository cannot read it).

    Raises:
        DataError: ``repo`` is not a folder, or cannot be listed.
    """
    repo = Path(repo)
    kind, why = _kind(repo)
    if kind != "dir":
        raise DataError({"missing": "model repository does not exist",
                         "bad": f"model repository {why}"}.get(kind, "is not a folder (a Triton model repository is "
                                                                     "one)"), repo)
    try:
        entries = _entries(repo)
    except OSError as exc:
        raise DataError(f"model repository cannot be listed ({_reason(exc)})", repo) from None
    findings: list[Finding] = []
    for p in entries:
        if p.name.startswith(TMP_PREFIX):
            findings.append(Finding(path=str(p), message="left over by an interrupted ctmask write; remove it "
                                                         "(Triton would try to load it as a model)"))
    for p in entries:
        kind, why = _kind(p)
        if kind == "bad" and not p.name.startswith("."):
            findings.append(Finding(path=str(p),
                                    message=f"{why}: Triton cannot tell whether it is a model folder; remove it"))
    folders = [p for p in entries if not p.name.startswith(".") and _kind(p)[0] == "dir"]
    if not folders:
        findings.append(Finding(path=str(repo), message="holds no model folder"))
    for folder in folders:
        findings += _check_model(folder)
    return findings


def _check_model(folder: Path) -> list[Finding]:
    path = folder / CONFIG
    out: list[Finding] = []

    def add(message: str, where: Path = path, line: int | None = None) -> None:
        out.append(Finding(path=str(where), message=message, line=line))

    kind, why = _kind(path)
    if kind == "missing":
        add(f"no {CONFIG} (ctmask writes one for every model)", folder)
        return out
    if kind != "file":
        add(why)
        return out
    _check_inside(path, folder.parent, add)
    text = _read_text(path, add)
    if text is None:
        return out
    try:
        config = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        add(re.sub(r"^\d+:\d+ : ", "", str(exc)) + " (not a valid Triton ModelConfig)", line=exc.GetLine())
        return out
    if config.name and config.name != folder.name:
        add(f"name {config.name!r} is not the folder's name {folder.name!r} (Triton refuses the model)")
    platform = config.platform or {b: p for p, (b, _) in PLATFORMS.items()}.get(config.backend, "")
    if platform not in PLATFORMS:
        add(f"platform {config.platform!r} / backend {config.backend!r}: check-triton checks "
            f"{' and '.join(PLATFORMS)} models only")
        return out
    backend, default_file = PLATFORMS[platform]
    if config.backend and config.backend != backend:
        add(f"backend {config.backend!r} does not serve platform {platform!r} (expected {backend!r})")
    if config.max_batch_size < 1:
        add(f"max_batch_size is {config.max_batch_size}: ctmask graphs batch on their first dimension, so it must "
            "be >= 1 (and dims leave the batch out)")
    for size in config.dynamic_batching.preferred_batch_size:
        if not 1 <= size <= config.max_batch_size:
            add(f"preferred_batch_size {size} is not within 1..max_batch_size ({config.max_batch_size})")
    for group in config.instance_group:
        if group.count < 0:
            add(f"instance_group count {group.count} is negative")
        if platform == PLAN_PLATFORM and group.kind == mc.ModelInstanceGroup.KIND_CPU:
            add("instance_group KIND_CPU: a TensorRT plan runs on a GPU only")
    _check_io_entries(config, add)
    file_name = _check_model_files(config, default_file, add)
    _check_warmup_settings(folder, config, add)
    try:
        entries = _entries(folder)
    except OSError as exc:
        add(f"cannot be listed ({_reason(exc)})", folder)
        entries = []
    versions = []
    for p in entries:
        if re.fullmatch(r"[1-9][0-9]*", p.name):
            kind, why = _kind(p)
            if kind == "dir":
                versions.append(int(p.name))
            elif kind == "bad":
                add(f"{why}: Triton cannot read it as version {p.name}", p)
            else:
                add("is a file, not a version folder: Triton ignores it", p)
        elif re.fullmatch(r"0[0-9]*", p.name) and _kind(p)[0] == "dir":
            add("a version folder starting with 0: Triton ignores it", p)
    versions.sort()
    if not versions:
        add(f"no version folder (1/{file_name or default_file} ...)", folder)
    for v in config.version_policy.specific.versions:
        if v not in versions:
            add(f"version_policy names version {v}, which has no folder")
    ctmask_written = "ctmask.format" in config.parameters
    recorded = _version_params(config)
    for v in sorted(set(recorded) - set(versions)):
        add(f"parameters describe version {v}, which has no folder")
    label_lines = _check_labels(folder, config, add)
    for v in versions if file_name is not None else ():
        model_file = folder / str(v) / file_name
        kind, why = _kind(model_file)
        if kind == "missing":
            add(f"version {v} has no {file_name} (platform {platform} loads that file)", model_file)
            continue
        if kind != "file":
            add(f"{why}: version {v}'s {file_name} must be the model file itself (ctmask writes one file)",
                model_file)
            continue
        _check_inside(model_file, folder.parent, add)
        sha = recorded.get(v, {}).get("sha256")
        try:
            if model_file.stat().st_size == 0:
                add("is empty", model_file)
                continue
            actual = sha256_file(model_file) if sha is not None else None
        except OSError as exc:
            add(f"unreadable ({_reason(exc)})", model_file)
            continue
        if ctmask_written and sha is None:
            add(f"records no sha256 of version {v} (ctmask.v{v}.sha256)")
        elif sha is not None and sha != actual:
            add(f"is not the file the config records (ctmask.v{v}.sha256 {sha[:12]}...): it was replaced after "
                "packaging", model_file)
        if platform == ONNX_PLATFORM:
            _check_onnx(model_file, config, label_lines, recorded.get(v, {}), add)
    if platform == PLAN_PLATFORM:
        _check_plan_config(config, label_lines, recorded, versions, add)
    return out


def _check_io_entries(config: mc.ModelConfig, add) -> None:
    """Each input / output listed once, without a ``reshape`` (ctmask writes none)."""
    for kind, entries in (("input", config.input), ("output", config.output)):
        for name, n in sorted(Counter(e.name for e in entries).items()):
            if n > 1:
                add(f"{kind} {name!r} is listed {n} times: ctmask lists each tensor once, and only one entry can "
                    "describe it (which one Triton goes by is not defined)")
        for e in entries:
            if e.HasField("reshape"):
                shape, dims = f"[{_join(e.reshape.shape)}]", f"[{_join(e.dims)}]"
                does = (f"Triton would feed the model {shape} instead of the {dims} a client sends" if kind == "input"
                        else f"Triton would take the model's output as {shape} and return it as {dims}")
                add(f"{kind} {e.name}: reshape {shape} is not written by ctmask; {does}; remove it")


def _check_model_files(config: mc.ModelConfig, default_file: str, add) -> str | None:
    """The file Triton loads from each version folder (None: a path, not read here), with a
    finding for ``default_model_filename`` / ``cc_model_filenames`` (ctmask writes neither)."""
    name = config.default_model_filename
    file_name: str | None = default_file
    if name and name != default_file:
        if _is_path(name):
            add(f"default_model_filename {name!r} is not written by ctmask, and is a path, not a file name of the "
                f"version folder: Triton would load N/{name} (outside the version folder) instead of "
                f"N/{default_file}; remove it")
            file_name = None
        else:
            add(f"default_model_filename {name!r} is not written by ctmask; Triton would load {name} from each "
                f"version folder instead of {default_file}; remove it")
            file_name = name
    for cc, cc_file in sorted(config.cc_model_filenames.items()):
        where = " (a path, outside the version folder)" if _is_path(cc_file) else ""
        add(f"cc_model_filenames {cc!r}: {cc_file!r} is not written by ctmask; Triton would load {cc_file}{where} "
            f"instead of {file_name or name} on GPUs of compute capability {cc}; remove it")
    return file_name


def _check_warmup_settings(folder: Path, config: mc.ModelConfig, add) -> None:
    """Each ``model_warmup``'s batch size within ``max_batch_size`` and its data files present
    (its inputs are checked against the model's in :func:`_check_warmup_inputs`)."""
    for w in config.model_warmup:
        if not 1 <= w.batch_size <= max(config.max_batch_size, 1):
            add(f"model_warmup {w.name!r}: batch_size {w.batch_size} is not within 1..max_batch_size "
                f"({config.max_batch_size}); Triton refuses to load the model")
        for name, value in sorted(w.inputs.items()):
            data = value.input_data_file
            if not data:
                continue
            if _escapes(data):
                add(f"model_warmup {w.name!r} input {name}: input_data_file {data!r} points outside the model's "
                    "warmup/ folder")
                continue
            kind, why = _kind(folder / "warmup" / data)
            if kind != "file":
                add(f"{why}: model_warmup {w.name!r} input {name} reads it (input_data_file, in the model's warmup/ "
                    "folder)", folder / "warmup" / data)


def _check_warmup_inputs(config: mc.ModelConfig, expected: dict[str, tuple[int | None, list[int] | None]],
                         what: str, add) -> None:
    """Each ``model_warmup`` gives every input of ``expected`` (name -> Triton data type, dims
    after the batch, -1 for any size; None: unknown) and nothing else, of its type and dims."""
    for w in config.model_warmup:
        head = f"model_warmup {w.name!r}"
        for name in sorted(set(expected) - set(w.inputs)):
            add(f"{head} gives no data for input {name!r} of {what} (Triton warms a model up with all its inputs)")
        for name, value in sorted(w.inputs.items()):
            if name not in expected:
                add(f"{head} names input {name!r}, which is not an input of {what} ({sorted(expected)})")
                continue
            want_type, want_dims = expected[name]
            if want_type is not None and value.data_type != want_type:
                add(f"{head} input {name}: data_type {mc.DataType.Name(value.data_type)}, {what} takes "
                    f"{mc.DataType.Name(want_type)}")
            got = list(value.dims)
            if want_dims is not None and (len(got) != len(want_dims) or any(
                    g < 1 or (w_ >= 0 and g != w_) for g, w_ in zip(got, want_dims))):
                add(f"{head} input {name}: dims [{_join(got)}], {what} takes [{_join(want_dims)}]"
                    + (" after the batch" if config.max_batch_size >= 1 else "")
                    + (" (-1: any size >= 1)" if -1 in want_dims else ""))


def _check_labels(folder: Path, config: mc.ModelConfig, add) -> list[str] | None:
    """The class names of the output carrying a label file (None if none does, or it cannot be read)."""
    names = None
    for o in config.output:
        if not o.label_filename:
            continue
        if _escapes(o.label_filename):
            add(f"output {o.name}'s label_filename {o.label_filename!r} points outside the model folder (ctmask "
                f"writes {LABELS} next to {CONFIG}); not read")
            continue
        path = folder / o.label_filename
        kind, why = _kind(path)
        if kind == "missing":
            add(f"output {o.name}'s label_filename {o.label_filename!r} does not exist", path)
            continue
        if kind != "file":
            add(f"{why}: output {o.name}'s label_filename must be a text file of class names", path)
            continue
        _check_inside(path, folder.parent, add)
        text = _read_text(path, add)
        if text is None:
            continue
        names = [line for line in text.splitlines() if line]
        if o.dims and o.dims[-1] > 0 and len(names) != o.dims[-1]:
            add(f"holds {len(names)} labels for output {o.name} of {o.dims[-1]} classes", path)
    return names


def _config_io(config: mc.ModelConfig):
    return {i.name: i for i in config.input}, {o.name: o for o in config.output}


def _tensors(graph: onnx.GraphProto):
    """Every tensor of ``graph``: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _check_external_data(proto: onnx.ModelProto, model_file: Path, add) -> None:
    """A finding per external data file the graph's tensors point to, and whether it is there."""
    from onnx.external_data_helper import uses_external_data

    files: dict[str, list[str]] = {}
    for tensor in _tensors(proto.graph):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            files.setdefault(location, []).append(tensor.name)
    for location, names in sorted(files.items()):
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        if not location:
            state = "no location is given"
        elif _escapes(location):
            state = "it lies outside the version folder"
        else:
            kind, why = _kind(model_file.parent / location)
            state = {"file": "the data file is present in the version folder",
                     "missing": "the data file is missing from the version folder"}.get(kind, f"the data file {why}")
        add(f"keeps the weights of {len(names)} initializer(s) ({listed}) in the external data file {location!r} "
            f"({state}): ctmask export writes one self-contained file and refuses such graphs, and Triton's copy of "
            f"{model_file.name} may lack the data file; re-export it as one file", model_file)


def _check_onnx(model_file: Path, config: mc.ModelConfig, label_lines: list[str] | None, meta: dict[str, str],
                add) -> None:
    """Config vs the ONNX file's own inputs / outputs, then vs its ctmask spec."""
    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError ...
        add(f"not a loadable ONNX model ({exc.__class__.__name__})", model_file)
        return
    _check_external_data(proto, model_file, add)
    graph_io = onnx_io(proto)
    batched = config.max_batch_size >= 1
    warmup: dict[str, tuple[int | None, list[int] | None]] = {}
    for kind, entries, declared in zip(("input", "output"), _config_io(config), graph_io):
        if kind == "input":
            warmup = {n: (ONNX_TO_TRITON.get(elem), None if dims is None else
                          [-1 if _is_batch(d) else int(d) for d in (dims[1:] if batched else dims)])
                      for n, (elem, dims) in declared.items()}
        for name in sorted(set(entries) - set(declared)):
            add(f"config {kind} {name!r} is not a graph {kind} of {model_file} (graph: {sorted(declared)})")
        for name in sorted(set(declared) - set(entries)):
            add(f"graph {kind} {name!r} of {model_file} is missing from the config")
        for name in sorted(set(entries) & set(declared)):
            entry, (elem, dims) = entries[name], declared[name]
            want_type = ONNX_TO_TRITON.get(elem)
            if entry.data_type != want_type:
                got = mc.DataType.Name(entry.data_type)
                want = mc.DataType.Name(want_type) if want_type is not None else f"ONNX type {elem}"
                add(f"{kind} {name}: data_type {got}, the graph's is {want}")
            if dims is None:
                add(f"graph {kind} {name} declares no shape: its config dims cannot be checked", model_file)
                continue
            if batched:
                if not dims or not _is_batch(dims[0]):
                    add(f"graph {kind} {name} has a fixed first dimension {dims[:1]}, but max_batch_size > 0 "
                        "makes it the batch", model_file)
                dims = dims[1:]
            want_dims = [-1 if _is_batch(d) else d for d in dims]
            if list(entry.dims) != want_dims:
                add(f"{kind} {name}: dims [{_join(entry.dims)}], the graph declares [{_join(want_dims)}]"
                    + (" after the batch" if batched else ""))
    _check_warmup_inputs(config, warmup, f"the graph {model_file}", add)
    try:
        spec = GraphSpec.from_metadata({p.key: p.value for p in proto.metadata_props}, model_file)
    except CtmaskError as exc:
        add(f"not a ctmask graph: {exc.message}", model_file)
        return
    _check_against_spec(config, spec, label_lines, add, str(model_file))
    if meta.get("precision", spec.precision) != spec.precision:
        add(f"records precision {meta['precision']!r}, the graph declares {spec.precision!r}")


def _check_against_spec(config: mc.ModelConfig, spec: GraphSpec, label_lines: list[str] | None, add,
                        what: str, check_params: bool = True) -> None:
    want_in, want_out = spec_dims(spec)
    for kind, entries, want in zip(("input", "output"), _config_io(config), (want_in, want_out)):
        if set(entries) != set(want):
            add(f"config {kind}s are {sorted(entries)}, the ctmask contract of {what} names {sorted(want)}")
        for name in sorted(set(entries) & set(want)):
            if entries[name].data_type != mc.TYPE_FP32:
                add(f"{kind} {name}: data_type {mc.DataType.Name(entries[name].data_type)}, the ctmask contract "
                    "is TYPE_FP32")
            if list(entries[name].dims) != want[name]:
                add(f"{kind} {name}: dims [{_join(entries[name].dims)}], the ctmask spec of {what} says "
                    f"[{_join(want[name])}] after the batch")
    if label_lines is None:
        if not any(o.label_filename for o in config.output):  # else its problem is a finding already
            add(f"no output carries a label_filename (ctmask attaches {LABELS} to probs)")
    elif label_lines != list(spec.class_names):
        add(f"labels {label_lines} are not the class names {list(spec.class_names)} of {what}")
    if check_params:
        for key, value in _contract(spec).items():
            if key in config.parameters and config.parameters[key].string_value != value:
                add(f"parameter {key} is {config.parameters[key].string_value!r}, {what} says {value!r}")


def _check_plan_config(config: mc.ModelConfig, label_lines: list[str] | None, recorded: dict[int, dict[str, str]],
                       versions: list[int], add) -> None:
    """A plan cannot be read here: its config is checked against the ctmask contract its
    parameters record (input size, N; the classes of its labels) and each version's batch profile."""
    params = {k: v.string_value for k, v in config.parameters.items()}
    if params.get("ctmask.format") != GRAPH_FORMAT:
        add(f"parameter ctmask.format is {params.get('ctmask.format')!r}, this ctmask writes {GRAPH_FORMAT!r}")
    try:
        spec = GraphSpec(preset=params["ctmask.preset"], image_size=int(params["ctmask.input_size"]),
                         n_rois=int(params["ctmask.n_rois"]),
                         **({"class_names": tuple(label_lines)} if label_lines else {}))
    except (KeyError, ValueError) as exc:
        add(f"tensorrt_plan config without a readable ctmask contract in its parameters ({exc.__class__.__name__}: "
            f"{exc}): its inputs and outputs cannot be checked")
    else:
        _check_against_spec(config, spec, label_lines, add, "its ctmask parameters", check_params=False)
    _check_warmup_inputs(config, {i.name: (i.data_type, list(i.dims)) for i in config.input}, "the config", add)
    for v in versions:
        profile = recorded.get(v, {}).get("profile")
        if profile is None:
            add(f"records no batch profile of version {v} (ctmask.v{v}.profile)")
            continue
        try:
            lo, _, hi = (int(x) for x in profile.split(","))
        except ValueError:
            add(f"ctmask.v{v}.profile {profile!r} is not MIN,OPT,MAX")
            continue
        if config.max_batch_size > hi:
            add(f"max_batch_size {config.max_batch_size} is above version {v}'s batch profile MAX {hi}: TensorRT "
                "refuses such batches")
        if lo > 1:
            add(f"version {v}'s batch profile starts at {lo}: Triton sends batches from 1 up")
