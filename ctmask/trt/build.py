"""Building a TensorRT engine from a proven ctmask ONNX graph.

Written against the TensorRT Python API (10.x, type-checked with ``tensorrt-stubs``; 11.x
through :class:`ctmask.trt.api.ApiPlan`) and not executed in this project's CI, which has
neither a GPU nor libnvinfer. What decides whether the build can succeed and be right is
checked before TensorRT is touched: the graph is a ctmask graph, its declared precision is
the one asked for, and ``check-trt`` (:mod:`ctmask.trt.check`) finds nothing fatal.

The build: a strongly typed network (precision comes from the ONNX file: FP16 tensors,
explicit int8 Q/DQ), the plugin library loaded for ``RoiAlign``, one optimisation profile
over the batch, a workspace limit, a timing cache read and saved, and the plan written with
its sidecar (:mod:`ctmask.trt.engine`) after it has been deserialised once and its inputs
and outputs checked against the graph spec.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ctmask.core.errors import ConfigError, EngineError
from ctmask.core.fileio import sha256_file, write_bytes_atomic
from ctmask.core.spec import INPUT, GraphSpec
from ctmask.trt.api import ApiPlan, init_plugins, make_logger, require_tensorrt
from ctmask.trt.engine import BatchProfile, EngineInfo, plan_sha256, write_engine

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass(frozen=True)
class BuildOptions:
    """Engine build options (the ``ctmask export --engine tensorrt`` flags)."""

    profile: BatchProfile = BatchProfile(1, 8, 32)
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    precision: str | None = None  # None: the graph's own
    device: int = 0
    verbose: bool = False


@dataclass(frozen=True)
class PreparedGraph:
    """A graph that passed every check that needs no GPU, ready for TensorRT."""

    path: Path
    spec: GraphSpec
    sha256: str
    content_sha256: str
    findings: tuple[str, ...]
    metadata: dict[str, str]


def prepare_graph(onnx_path: str | Path, options: BuildOptions, trt_major: int = 10) -> PreparedGraph:
    """Everything before TensorRT: read the graph, match its precision, run check-trt.

    Raises:
        ModelError: not a loadable ctmask graph.
        ConfigError: ``options.precision`` differs from the graph's declared precision,
            or the workspace is not positive.
        EngineError: check-trt found fatal problems (each line names the node).
    """
    from ctmask.core.graphs import content_sha256, load_proto, spec_of
    from ctmask.trt.check import check_graph, fatal

    path = Path(onnx_path)
    proto = load_proto(path)
    spec = spec_of(proto, path)
    if options.precision is not None and options.precision != spec.precision:
        raise ConfigError(f"{path} is a {spec.precision} graph, not {options.precision}: build the engine from the "
                          f"{options.precision} graph (ctmask export CKPT --precision {options.precision} --out "
                          "MODEL.onnx) or from the checkpoint")
    if not options.workspace_gb > 0:
        raise ConfigError(f"--workspace must be a positive number of GB, got {options.workspace_gb}")
    findings = check_graph(proto, trt_major, max_batch=options.profile.max)
    bad = fatal(findings)
    if bad:
        lines = "\n  ".join(str(f) for f in bad)
        raise EngineError(f"TensorRT {trt_major}.x would refuse this graph ({len(bad)} fatal finding(s) of "
                          f"check-trt):\n  {lines}", path,
                          hint=f"ctmask check-trt {path} --trt-version {trt_major} lists every finding")
    return PreparedGraph(path, spec, sha256_file(path), content_sha256(proto), tuple(str(f) for f in findings),
                         {p.key: p.value for p in proto.metadata_props})


def _parser_errors(parser: trt.OnnxParser) -> str:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node_name() or f"node #{err.node()}"
        lines.append(f"{node}: {err.desc()}")
    return "\n  ".join(lines) or "no detail"


def check_io(engine: trt.ICudaEngine, spec: GraphSpec, path: Path) -> None:
    """The engine has ctmask's input and outputs, all float32.

    Raises:
        EngineError: naming what differs.
    """
    import tensorrt as trt

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if inputs != [INPUT] or sorted(outputs) != sorted(spec.outputs):
        raise EngineError(f"engine has inputs {inputs} and outputs {outputs}; expected [{INPUT!r}] and "
                          f"{list(spec.outputs)}", path)
    wrong = {n: str(engine.get_tensor_dtype(n)) for n in names if engine.get_tensor_dtype(n) != trt.DataType.FLOAT}
    if wrong:
        raise EngineError(f"engine inputs/outputs must be float32; found {wrong}", path)


def _builder_config(builder: trt.Builder, options: BuildOptions, spec: GraphSpec, path: Path) -> trt.IBuilderConfig:
    """The build's configuration: workspace, the batch profile over ``images`` and the timing cache.

    Raises:
        EngineError: TensorRT refuses the profile, or the timing cache does not fit.
    """
    import tensorrt as trt

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    profile = builder.create_optimization_profile()
    shapes = options.profile.shapes(spec)
    profile.set_shape(INPUT, *(trt.Dims(list(shapes[k])) for k in ("min", "opt", "max")))
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"TensorRT refused the batch profile {options.profile.to_dict()}", path)

    cache_in = b""
    if options.timing_cache is not None and options.timing_cache.is_file():
        cache_in = options.timing_cache.read_bytes()
    cache = config.create_timing_cache(cache_in)
    if not config.set_timing_cache(cache, False):
        raise EngineError("the timing cache does not fit this TensorRT / GPU (delete it to start a new one)",
                          options.timing_cache)
    return config


def build_engine(onnx_path: str | Path, out: str | Path, options: BuildOptions,
                 on_step: Callable[[str], None] | None = None) -> EngineInfo:
    """Build ``out`` (and ``out.json``) from a ctmask ONNX graph.

    Raises:
        TensorRTUnavailable: TensorRT, CUDA or a GPU is missing (nothing written).
        EngineError / ConfigError / ModelError: the graph cannot be built (nothing written).
    """
    from ctmask.trt.cuda import open_cuda

    step = on_step or (lambda s: None)
    version = require_tensorrt()
    import tensorrt as trt

    api = ApiPlan.for_version(version)
    cuda = open_cuda(options.device)
    try:
        gpu = cuda.gpu()
    finally:
        cuda.close()
    step("check-trt")
    graph = prepare_graph(onnx_path, options, version.major)
    path, spec = graph.path, graph.spec
    t0 = time.perf_counter()

    logger = make_logger(options.verbose)
    init_plugins(logger)
    builder = trt.Builder(logger)
    network = builder.create_network(api.network_flags())
    parser = trt.OnnxParser(network, logger)
    step("parsing")
    if not parser.parse_from_file(str(path)):
        raise EngineError(f"TensorRT's ONNX parser refused the graph:\n  {_parser_errors(parser)}", path)

    config = _builder_config(builder, options, spec, path)

    step(f"building ({spec.precision}, batch {options.profile.min}-{options.profile.max}, TensorRT {version})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT could not build an engine from the graph (its log above says why)", path)
    plan = bytes(serialized)

    step("checking the plan")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineError("TensorRT built a plan it cannot deserialise", path)
    check_io(engine, spec, path)

    if options.timing_cache is not None:
        write_bytes_atomic(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    info = EngineInfo(
        tensorrt_version=version.text,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        onnx_sha256=graph.sha256,
        onnx_content_sha256=graph.content_sha256,
        graph_metadata=graph.metadata,
        profile=options.profile,
        plan_sha256=plan_sha256(plan),
        plan_bytes=len(plan),
        workspace_gb=options.workspace_gb,
        timing_cache=None if options.timing_cache is None else str(options.timing_cache),
        build_seconds=round(time.perf_counter() - t0, 2),
        onnx_file=str(path),
        plugins=("libnvinfer_plugin (ROIAlign_TRT)",),
        check_findings=graph.findings,
    )
    write_engine(out, plan, info)
    return info

