"""Writing ctmask graphs and engines into a Triton model repository (layout and config:
:mod:`ctmask.scale.triton_schema`).

Everything is written atomically: a new model folder is assembled in a temporary sibling
folder (``.ctmask-tmp-*``) and renamed into place; a new version of an existing model is
assembled inside the model folder (Triton ignores folders whose name is not a number) and
renamed to its number, then the config is replaced atomically. A version folder is never
overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ctmask.core.errors import ConfigError, DataError, ModelError
from ctmask.core.fileio import fsync_dir, fsync_file, sha256_file, write_text_atomic
from ctmask.core.graphs import spec_of
from ctmask.core.spec import INPUT
from ctmask.scale.triton_schema import (
    CONFIG,
    CONTRACT_KEYS,
    DEFAULT_MAX_BATCH,
    ENGINE_SUFFIX,
    KINDS,
    LABELS,
    MAX_BATCH,
    ONNX_PLATFORM,
    PLAN_PLATFORM,
    PLATFORMS,
    TMP_PREFIX,
    check_name,
    contract_params,
    contract_problems,
    is_batch,
    mc,
    onnx_io,
    parse_config,
    spec_dims,
    text_format,
    version_numbers,
    version_params,
)

PLUGIN_NOTE = ("the plan calls the ROIAlign_TRT plugin of TensorRT's standard plugin library (libnvinfer_plugin), "
               "which Triton's TensorRT backend registers when it starts; serve it with the TensorRT release that "
               "built it (ctmask.vN.tensorrt_version)")


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
    spec = spec_of(proto, graph, check_shapes=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ModelError("graph keeps weights in external data files; Triton's model.onnx is copied alone", graph,
                         hint="re-export it as one file (ctmask export writes one)")
    problems = contract_problems(proto, spec)
    if problems:
        raise ModelError("graph's declared shapes disagree with its ctmask spec; not packaged:\n  - "
                         + "\n  - ".join(problems), graph)
    inputs, outputs = onnx_io(proto)
    order = [INPUT, *spec.outputs]
    to_triton = {n: [-1 if is_batch(d) else int(d) for d in dims[1:]]  # type: ignore[index]
                 for n, (_, dims) in {**inputs, **outputs}.items()}
    return _Model(
        name=name, platform=ONNX_PLATFORM, source=graph, sha256=sha256_file(graph),
        inputs={n: to_triton[n] for n in order if n in inputs},
        outputs={n: to_triton[n] for n in order if n in outputs},
        class_names=spec.class_names, contract=contract_params(spec),
        version_meta={"precision": spec.precision, "ctmask_version": spec.version,
                      "weights_sha256": spec.weights_sha256, "source": graph.name},
    )


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
        outputs={n: outputs[n] for n in spec.outputs}, class_names=spec.class_names, contract=contract_params(spec),
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
    existing, old_versions, old_params = _existing(folder)
    max_batch = _max_batch(m, folder, old_params, max_batch)
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
    _check_contract(existing, render(version or 1), m, folder, labels)
    found = version is None
    if version is None:
        same = [v for v in old_versions if sha256_file(folder / str(v) / m.file_name) == m.sha256]
        if not same:
            return plan(max(old_versions, default=0) + 1, "add")
        version = same[-1]
    elif version not in old_versions:
        return plan(version, "add")
    return _unchanged(plan(version, "unchanged"), existing, found)


def _existing(folder: Path) -> tuple[mc.ModelConfig | None, list[int], dict[int, dict[str, str]]]:
    """The config of the model folder already at ``folder`` (None: no folder), its versions
    and their recorded parameters; ConfigError when ``folder`` is not a model folder."""
    if not folder.exists():
        return None, [], {}
    if not folder.is_dir():
        raise ConfigError("exists and is not a model folder", folder)
    if not (folder / CONFIG).is_file():
        raise ConfigError(f"exists without a {CONFIG}: not a model folder ctmask wrote", folder,
                          hint="remove it or choose another --triton-name")
    existing = parse_config(folder / CONFIG)
    old_versions = version_numbers(folder)
    old_params = {v: p for v, p in version_params(existing).items() if v in old_versions}
    return existing, old_versions, old_params


def _max_batch(m: _Model, folder: Path, old_params: dict[int, dict[str, str]], max_batch: int | None) -> int:
    """``max_batch_size``: ``max_batch``, or by default the engine's profile MAX (32 for a graph);
    ConfigError when it is above the MAX of the engine or of an engine version already served."""
    # An engine's batch limit is its profile's MAX, for every engine version the config serves.
    limits: dict[int, int] = {0: m.profile_max} if m.profile_max is not None else {}
    if m.platform == PLAN_PLATFORM:
        limits.update({v: int(p["profile"].split(",")[-1]) for v, p in old_params.items() if "profile" in p})
    limit = min(limits.values()) if limits else None
    if max_batch is None:
        return limit if limit is not None else DEFAULT_MAX_BATCH
    if limit is not None and max_batch > limit:
        whose = min(v for v, lim in limits.items() if lim == limit)
        raise ConfigError(f"--triton-max-batch {max_batch} is above the batch profile's MAX {limit} of "
                          + ("the engine" if whose == 0 else f"version {whose}") + ": TensorRT refuses larger "
                          "batches; nothing was written", m.source if whose == 0 else folder / str(whose),
                          hint=f"pass --triton-max-batch {limit} or less, or rebuild the engine with a larger --batch")
    return max_batch


def _check_contract(existing: mc.ModelConfig, config_text: str, m: _Model, folder: Path, labels: str) -> None:
    """ConfigError when the model folder's config (or labels) is of another contract than ``m``'s."""
    candidate = text_format.Parse(config_text, mc.ModelConfig())
    diff = _differences(existing, candidate, ("platform", "backend", "input", "output"))
    diff += [k for k in CONTRACT_KEYS if k not in existing.parameters
             or existing.parameters[k].string_value != m.contract[k]]
    if not (folder / LABELS).is_file() or (folder / LABELS).read_bytes() != labels.encode("utf-8"):
        diff.append(LABELS)
    if diff:
        raise ConfigError(f"holds a model of another contract ({', '.join(diff)} differ): the versions of one "
                          "Triton model share one config; nothing was written", folder,
                          hint="choose another --triton-name (or remove that model folder)")


def _unchanged(new: _Plan, existing: mc.ModelConfig, found: bool) -> _Plan:
    """``new`` when its version exists already with the same file and config (nothing to write);
    ConfigError otherwise (``found``: the version was the one holding this very file)."""
    m, folder, version = new.model, new.folder, new.version
    target = folder / str(version) / m.file_name
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
            parse_config(folder / CONFIG)
