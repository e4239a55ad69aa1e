"""TensorRT backend: runs a ctmask engine (``ctmask export ... --engine tensorrt``).

Written against the TensorRT Python API (10.x, type-checked with ``tensorrt-stubs``; 11.x
through :class:`ctmask.trt.api.ApiPlan`) and cuda-python / torch.cuda; not executed in this
project's CI, which has no GPU and no libnvinfer. What runs there: the sidecar checks
(an engine of another TensorRT, GPU or graph contract is refused before TensorRT is
touched), the batch chunking, and the missing-TensorRT / missing-GPU messages.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctmask.core.errors import CtmaskWarning, EngineError
from ctmask.core.spec import INPUT, GraphSpec
from ctmask.runtime.runner import Runner
from ctmask.trt.build import check_io
from ctmask.trt.engine import EngineInfo, check_compatible, check_plan, read_sidecar

if TYPE_CHECKING:
    import tensorrt as trt


class TensorRTRunner(Runner):
    """Run a TensorRT engine on one GPU, batched within the engine's optimisation profile.

    Batches above the profile's maximum are split; a remainder below its minimum is padded
    (with zeros) and the padding rows dropped. Host buffers are pinned and sized for the
    profile's maximum; device buffers are allocated once; copies and the execution are
    queued on one CUDA stream (``execute_async_v3``).

    Args:
        path: engine file (``.engine``), with its ``.engine.json`` sidecar beside it.
        device: CUDA device index.
    """

    def __init__(self, path: str | Path, device: int = 0):
        super().__init__()
        self.path = Path(path)
        self.device = device
        self.name = "tensorrt-cuda"
        self.info: EngineInfo | None = None
        self._cuda: Any = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._runtime: trt.Runtime | None = None
        self._buffers: dict[str, Any] = {}
        self._gpu: Any = None

    def activate_impl(self) -> GraphSpec:
        from ctmask.trt.api import init_plugins, make_logger, require_tensorrt
        from ctmask.trt.cuda import open_cuda

        info = read_sidecar(self.path)  # refused here, before TensorRT, if the sidecar is wrong
        version = require_tensorrt()
        import tensorrt as trt

        cuda = open_cuda(self.device)
        try:
            gpu = cuda.gpu()
            check_compatible(info, self.path, version.text, gpu.name, gpu.compute_capability)
            if gpu.name != info.gpu_name:
                warnings.warn(f"{self.path}: built on {info.gpu_name}, running on {gpu.name} (same compute capability "
                              f"{gpu.compute_capability}: it runs, but its tactics were timed on the other GPU)",
                              CtmaskWarning, stacklevel=2)
            plan = self.path.read_bytes()
            check_plan(info, plan, self.path)
            logger = make_logger()
            init_plugins(logger)
            runtime = trt.Runtime(logger)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise EngineError("TensorRT could not deserialise the engine (its log above says why)", self.path)
            spec = info.spec
            check_io(engine, spec, self.path)
            self._check_profile(engine, info, spec)
            context = engine.create_execution_context()
            if context is None:
                raise EngineError("TensorRT could not create an execution context (GPU memory?)", self.path)
            top = info.profile.max
            self._buffers = {INPUT: cuda.buffer(tuple(int(d) for d in spec.input_shape(top)), np.dtype(np.float32))}
            for name, shape in spec.output_shapes(top).items():
                self._buffers[name] = cuda.buffer(tuple(int(d) for d in shape), np.dtype(np.float32))
            for name, buf in self._buffers.items():
                if not context.set_tensor_address(name, buf.device_ptr):
                    raise EngineError(f"TensorRT refused the device address of {name!r}", self.path)
        except BaseException:
            cuda.close()
            raise
        self.info, self._cuda, self._engine, self._context, self._gpu = info, cuda, engine, context, gpu
        self._runtime = runtime
        return spec

    def _check_profile(self, engine: trt.ICudaEngine, info: EngineInfo, spec: GraphSpec) -> None:
        lo, _, hi = ([int(d[i]) for i in range(len(d))] for d in engine.get_tensor_profile_shape(INPUT, 0))
        if lo[0] != info.profile.min or hi[0] != info.profile.max or tuple(lo[1:]) != spec.input_shape(1)[1:]:
            raise EngineError(f"engine's profile {lo} .. {hi} differs from its sidecar's batch "
                              f"{info.profile.min}..{info.profile.max} and input {spec.input_shape(1)[1:]}", self.path)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, info = self._context, self.info
        if context is None or info is None:
            raise RuntimeError(f"{self.name}: not active")
        images = feed[INPUT]
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.spec.outputs}
        per_in = int(np.prod(images.shape[1:])) * 4
        for start, stop, run in info.profile.chunks(images.shape[0]):
            host_in = self._buffers[INPUT].host
            host_in[: stop - start] = images[start:stop]
            if run > stop - start:
                host_in[stop - start: run] = 0.0
            if not context.set_input_shape(INPUT, (run, *images.shape[1:])):
                raise EngineError(f"TensorRT refused batch {run} (profile {info.profile.to_dict()})", self.path)
            self._cuda.upload(self._buffers[INPUT], run * per_in)
            if not context.execute_async_v3(self._cuda.stream_handle):
                raise EngineError("TensorRT execution failed (execute_async_v3 returned False)", self.path)
            for name in self.spec.outputs:
                buf = self._buffers[name]
                self._cuda.download(buf, run * int(np.prod(buf.host.shape[1:])) * 4)
            self._cuda.synchronize()
            for name in self.spec.outputs:
                parts[name].append(np.array(self._buffers[name].host[: stop - start], copy=True))
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}

    def deactivate_impl(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None
        if self._cuda is not None:
            self._cuda.close()
        self._cuda = None
        self._buffers = {}

    def describe(self) -> dict:
        d: dict[str, Any] = {"backend": self.name, "model": str(self.path)}
        if self.info is not None:
            d.update(tensorrt=self.info.tensorrt_version, precision=self.info.spec.precision,
                     profile=self.info.profile.to_dict(), built_on=self.info.gpu_name)
        if self._gpu is not None:
            d.update(provider=f"TensorRT on {self._gpu.name}", gpu=self._gpu.to_dict(),
                     cuda_binding=getattr(self._cuda, "name", None))
        return d

    def memory_report(self) -> dict:
        return {} if self._cuda is None else {"gpu_used_mb": round(self._cuda.memory_used_mb(), 1)}
