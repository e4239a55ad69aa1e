"""The one backend registry: which backends can run a model, and the runner that runs it.

Every command that runs a model makes its runner here: ``infer`` (and its Ray actors),
``serve`` replicas, ``loadtest``, ``bench`` (through resolvers, which say per backend and
device whether it can run here, and why not) and ``parity`` (the graph under test).

- a checkpoint (``.pt``, ``.pth``) runs in torch (:class:`ctmask.exporter.reference.TorchRunner`);
- a TensorRT engine (``.engine``) runs in TensorRT on the GPU, and only there;
- an ONNX graph runs in onnxruntime (CPU or CUDA) or OpenVINO (CPU).

Nothing here imports torch at import time: a checkpoint's runner imports it when built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from ctmask.core.errors import ConfigError
from ctmask.core.spec import GraphSpec
from ctmask.runtime.bench import ONCE, BenchPlan, MultiPlan
from ctmask.runtime.openvino_runner import HINTS, OpenVinoRunner, import_openvino
from ctmask.runtime.runner import OnnxRuntimeRunner, Runner, onnxruntime_devices

CHECKPOINT_SUFFIXES = (".pt", ".pth")
"""Suffixes of the checkpoints that run in torch."""

BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "openvino-cpu", "tensorrt-cuda", "torch-cpu", "torch-cuda")
"""Backends benchmarked by default (each one that can run here)."""
ON_REQUEST = ("openvino-bf16",)
"""Backends benchmarked only when named: OpenVINO with the bf16 precision hint changes class
calls, so it is a figure to report, never a default."""

Resolver = Callable[[str, GraphSpec], tuple[Callable[[], Runner] | None, str]]
"""(device, graph spec) -> (runner factory, "") or (None, why the backend cannot run here)."""


def make_runner(model: Path, backend: str = "auto", device: str = "cpu", threads: int | None = None) -> Runner:
    """The runner for ``model``: a checkpoint runs in torch, an engine (``.engine``) in
    TensorRT on the GPU, anything else in onnxruntime (or, when asked, OpenVINO on the CPU
    with the f32 precision hint)."""
    from ctmask.trt.engine import is_engine_path

    model = Path(model)
    if backend == "auto":
        backend = ("torch" if model.suffix.lower() in CHECKPOINT_SUFFIXES else
                   "tensorrt" if is_engine_path(model) else "onnxruntime")
    if backend == "tensorrt" or is_engine_path(model):
        if backend != "tensorrt" or not is_engine_path(model):
            raise ConfigError(f"{model}: TensorRT runs engine files (.engine, from `ctmask export MODEL.onnx --engine "
                              f"tensorrt`) and an engine runs on TensorRT only; got backend {backend}")
        from ctmask.runtime.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(model)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(model, device=device, threads=threads)
    if backend == "openvino":
        if device != "cpu":
            raise ConfigError(f"the openvino backend runs on the CPU only; got --device {device}")
        return OpenVinoRunner(model, threads=threads)
    if backend == "torch":
        from ctmask.exporter.reference import TorchRunner

        return TorchRunner(model, device=device, threads=threads)
    raise ConfigError(f"unknown backend {backend!r}; expected auto, onnxruntime, openvino, tensorrt or torch")


def graph_runner(model: str | Path) -> Runner:
    """The runner of an exported model (parity's graph under test): a TensorRT engine
    (``.engine``) in TensorRT, an ONNX graph in onnxruntime on the CPU."""
    from ctmask.trt.engine import is_engine_path

    return make_runner(Path(model), "tensorrt" if is_engine_path(model) else "onnxruntime")


def model_spec(model: str | Path) -> GraphSpec:
    """The ctmask spec of an ONNX file, from its metadata (no backend, weights not loaded), or
    of a TensorRT engine, from its sidecar.

    Raises:
        ModelError: the file is missing, not ONNX, or not a ctmask graph.
    """
    from ctmask.core.graphs import read_spec
    from ctmask.trt.engine import is_engine_path, read_sidecar

    if is_engine_path(model):
        return read_sidecar(model).spec
    return read_spec(model)


def onnxruntime_resolver(model: Path, threads: int | None) -> Resolver:
    """Resolver of the ``onnxruntime-*`` backends for ``model``."""

    def resolve(device: str, spec: GraphSpec) -> tuple[Callable[[], Runner] | None, str]:
        if _is_engine(model):
            return None, "an engine runs on tensorrt only"
        if device not in onnxruntime_devices():
            return None, "this onnxruntime build has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        return functools.partial(OnnxRuntimeRunner, model, device, threads), ""

    return resolve


def openvino_resolver(model: Path, threads: int | None) -> Resolver:
    """Resolver of the ``openvino-*`` backends for ``model``: ``openvino-cpu`` (f32 hint) and
    ``openvino-bf16`` (bf16 hint, on the CPU too); skipped when OpenVINO is not installed."""

    def resolve(device: str, spec: GraphSpec) -> tuple[Callable[[], Runner] | None, str]:
        if _is_engine(model):
            return None, "an engine runs on tensorrt only"
        hint = "f32" if device == "cpu" else device
        if hint not in HINTS:
            return None, f"no OpenVINO precision hint {device!r}"
        try:
            import_openvino()
        except ConfigError as exc:
            return None, f"{exc.message} ({exc.hint})"
        return functools.partial(OpenVinoRunner, model, threads, hint), ""

    return resolve


def _is_engine(model: Path) -> bool:
    from ctmask.trt.engine import is_engine_path

    return is_engine_path(model)


def tensorrt_resolver(model: Path) -> Resolver:
    """Resolver of ``tensorrt-cuda`` for an engine file; skipped (with the reason) for an ONNX
    graph, or where TensorRT, CUDA or a GPU is missing."""

    def resolve(device: str, spec: GraphSpec) -> tuple[Callable[[], Runner] | None, str]:
        if not _is_engine(model):
            return None, "runs engine files (ctmask export MODEL.onnx --engine tensorrt)"
        from ctmask.core.errors import TensorRTUnavailable
        from ctmask.runtime.tensorrt_runner import TensorRTRunner
        from ctmask.trt.api import require_tensorrt
        from ctmask.trt.cuda import open_cuda

        try:
            require_tensorrt()
            open_cuda().close()
        except TensorRTUnavailable as exc:
            return None, f"{exc.message} ({exc.hint})" if exc.hint else exc.message
        return functools.partial(TensorRTRunner, model), ""

    return resolve


def torch_resolver(checkpoint: str | Path | None, threads: int | None) -> Resolver:
    """Resolver of the ``torch-*`` backends: the PyTorch reference of a graph, ``checkpoint`` or
    the one named in the graph's metadata (if present and unchanged). torch is imported only
    when a torch backend is resolved: an onnxruntime-only bench stays torch-free."""

    def resolve(device: str, spec: GraphSpec) -> tuple[Callable[[], Runner] | None, str]:
        try:
            import torch

            from ctmask.exporter.reference import TorchRunner, reference_checkpoint
        except ImportError:
            return None, "torch is not installed (pip install 'ctmask[train]')"
        if device == "cuda" and not torch.cuda.is_available():
            return None, "torch sees no CUDA device"
        ckpt, why = reference_checkpoint(spec, None if checkpoint is None else Path(checkpoint))
        if ckpt is None:
            return None, why
        return functools.partial(TorchRunner, ckpt, device, threads), ""

    return resolve


def bench_resolvers(checkpoint: str | Path | None, threads: int | None) -> Callable[[Path], dict[str, Resolver]]:
    """Model -> its resolvers per backend kind, for :func:`plan_models`: onnxruntime, OpenVINO,
    TensorRT, and the PyTorch reference (``checkpoint``, or the one the model's metadata names)."""

    def resolvers(model: Path) -> dict[str, Resolver]:
        return {"onnxruntime": onnxruntime_resolver(model, threads), "openvino": openvino_resolver(model, threads),
                "tensorrt": tensorrt_resolver(model), "torch": torch_resolver(checkpoint, threads)}

    return resolvers


def plan_backends(model: str | Path, wanted: list[str] | None, resolvers: dict[str, Resolver]) -> BenchPlan:
    """Resolve the backends to benchmark one model; unavailable ones are skipped with a reason.

    Args:
        model: ctmask ONNX file.
        wanted: backend names, from :data:`BACKENDS` and :data:`ON_REQUEST` (default: all of
            :data:`BACKENDS`).
        resolvers: per backend kind ("onnxruntime", "openvino", "tensorrt", "torch"), what builds
            its runners (:func:`bench_resolvers`).

    Raises:
        ConfigError: an unknown backend name, or an explicitly requested backend that
            cannot run here.
        ModelError: the model is missing or not a ctmask graph.
    """
    return plan_models([model], wanted, lambda _: resolvers).plans[0]


def plan_models(models: Sequence[str | Path], wanted: list[str] | None,
                resolvers: Callable[[Path], dict[str, Resolver]]) -> MultiPlan:
    """Resolve the backends to benchmark several graphs of one model (e.g. FP32, FP16, INT8).

    Every graph is planned on every backend; the checkpoint backends (``torch-*``, see
    :data:`ONCE`) only for the first graph, whose metadata names the checkpoint.

    Args:
        models: ctmask ONNX files, all of one preset and input size.
        wanted: as for :func:`plan_backends`.
        resolvers: model -> its resolvers per backend kind (as for :func:`plan_backends`).

    Raises:
        ConfigError: no model, a model given twice, models of different input sizes (graphs
            of different presets at one size run on the same inputs: e.g. a lightweight
            model against the paper's), an unknown backend name, or an explicitly requested backend that cannot
            run here.
        ModelError: a model is missing or not a ctmask graph.
    """
    paths = [Path(m) for m in models]
    if not paths:
        raise ConfigError("no model to benchmark")
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise ConfigError(f"{path} is given twice" + (f" (as {seen[key]})" if seen[key] != path else ""))
        seen[key] = path
    specs = [model_spec(p) for p in paths]
    first = specs[0]
    for path, spec in zip(paths[1:], specs[1:], strict=True):
        if spec.image_size != first.image_size:
            raise ConfigError(
                f"all models must share the input size, to run on the same inputs: {paths[0]} is "
                f"{first.preset} ({first.image_size} x {first.image_size}), {path} is {spec.preset} "
                f"({spec.image_size} x {spec.image_size})")
    for name in wanted or ():
        if name not in BACKENDS + ON_REQUEST:
            raise ConfigError(f"unknown backend {name!r}; expected one of {list(BACKENDS + ON_REQUEST)}")
    names = list(dict.fromkeys(wanted or BACKENDS))
    plans = []
    for i, (path, spec) in enumerate(zip(paths, specs, strict=True)):
        plan = BenchPlan(path, spec)
        offered = resolvers(path)
        for name in names:
            kind, device = name.rsplit("-", 1)
            if i and kind in ONCE:
                continue
            resolver = offered.get(kind)
            factory, why = resolver(device, spec) if resolver else (None, f"no {kind} backend was offered")
            if factory is None:
                plan.skipped[name] = why
            else:
                plan.factories[name] = factory
        plans.append(plan)
    skipped = plans[0].skipped
    if wanted:
        missing = [n for n in names if n in skipped]
        if missing:
            raise ConfigError("cannot run " + "; ".join(f"{n}: {skipped[n]}" for n in missing))
    if not plans[0].factories:
        raise ConfigError("no backend can run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return MultiPlan(plans)
