"""The CUDA side of the TensorRT runner: the GPU's identity, device and pinned host buffers,
a stream. Two implementations behind one small interface: cuda-python (``cuda.bindings``,
installed by ``ctmask[trt]``) and PyTorch (where it is installed with CUDA).

Written against cuda-python's runtime API (``cudaMalloc``, ``cudaMallocHost``,
``cudaMemcpyAsync``, ``cudaStreamCreate`` ... each returning ``(error, value...)``) and
torch.cuda; not executed in this project's CI, which has no GPU.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctmask.core.errors import TensorRTUnavailable

CUDA_HINT = "pip install 'ctmask[trt]' (cuda-python) on a machine with an NVIDIA GPU and driver"


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built for or run on."""

    name: str
    compute_capability: str  # "9.0"
    memory_mb: int
    index: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "compute_capability": self.compute_capability, "memory_mb": self.memory_mb,
                "index": self.index}


def _cudart() -> Any | None:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6 / older
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


@dataclass
class Buffer:
    """One tensor's pinned host array and its device memory (``device_ptr``) of equal size."""

    host: np.ndarray
    device_ptr: int
    handle: Any = None  # the allocator's own objects, kept alive with the buffer


class CudaPython:
    """Device memory, pinned host memory and a stream through cuda-python's runtime API."""

    name = "cuda-python"

    def __init__(self, cudart: Any, device: int = 0):
        self.rt = cudart
        self.device = device
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []
        self._check(self.rt.cudaSetDevice(device), "cudaSetDevice")
        self.stream = self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def _check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, text = self.rt.cudaGetErrorString(err)
            raise TensorRTUnavailable(f"CUDA {what} failed: {text.decode() if isinstance(text, bytes) else text}",
                                      hint=None)
        return values[0] if len(values) == 1 else tuple(values) if values else None

    def gpu(self) -> GpuInfo:
        prop = self._check(self.rt.cudaGetDeviceProperties(self.device), "cudaGetDeviceProperties")
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return GpuInfo(name.rstrip("\x00"), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem) // 2**20,
                       self.device)

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> Buffer:
        """Pinned (page-locked) host memory, so copies run asynchronously at full speed, and
        device memory of the same size."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        host_ptr = int(self._check(self.rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        self._host_ptrs.append(host_ptr)
        dev_ptr = int(self._check(self.rt.cudaMalloc(nbytes), "cudaMalloc"))
        self._device_ptrs.append(dev_ptr)
        raw = memoryview((ctypes.c_byte * nbytes).from_address(host_ptr)).cast("B")
        return Buffer(np.frombuffer(raw, dtype=dtype).reshape(shape), dev_ptr)

    def upload(self, buf: Buffer, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(buf.device_ptr, buf.host.ctypes.data, nbytes, kind, self.stream),
                    "cudaMemcpyAsync")

    def download(self, buf: Buffer, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(buf.host.ctypes.data, buf.device_ptr, nbytes, kind, self.stream),
                    "cudaMemcpyAsync")

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def memory_used_mb(self) -> float:
        free, total = self._check(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return (int(total) - int(free)) / 2**20

    def close(self) -> None:
        for ptr in self._device_ptrs:
            self.rt.cudaFree(ptr)
        for ptr in self._host_ptrs:
            self.rt.cudaFreeHost(ptr)
        self._device_ptrs.clear()
        self._host_ptrs.clear()
        self.rt.cudaStreamDestroy(self.stream)


class TorchCuda:
    """The same through PyTorch's CUDA allocator and streams (when torch with CUDA is installed)."""

    name = "torch"

    def __init__(self, torch: Any, device: int = 0):
        self.torch = torch
        self.index = device
        self.device = torch.device("cuda", device)
        self.stream = torch.cuda.Stream(device=self.device)
        self._buffers: list[Buffer] = []

    def gpu(self) -> GpuInfo:
        p = self.torch.cuda.get_device_properties(self.index)
        return GpuInfo(p.name, f"{p.major}.{p.minor}", int(p.total_memory) // 2**20, self.index)

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> Buffer:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        host = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)
        dev = self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)
        buf = Buffer(host.numpy().view(dtype).reshape(shape), int(dev.data_ptr()), (host, dev))
        self._buffers.append(buf)
        return buf

    def upload(self, buf: Buffer, nbytes: int) -> None:
        host, dev = buf.handle
        with self.torch.cuda.stream(self.stream):
            dev[:nbytes].copy_(host[:nbytes], non_blocking=True)

    def download(self, buf: Buffer, nbytes: int) -> None:
        host, dev = buf.handle
        with self.torch.cuda.stream(self.stream):
            host[:nbytes].copy_(dev[:nbytes], non_blocking=True)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def memory_used_mb(self) -> float:
        free, total = self.torch.cuda.mem_get_info(self.index)
        return (int(total) - int(free)) / 2**20

    def close(self) -> None:
        self._buffers.clear()


def open_cuda(device: int = 0) -> CudaPython | TorchCuda:
    """CUDA through cuda-python, else through torch; a clear error when neither can reach a GPU.

    Raises:
        TensorRTUnavailable: no CUDA binding installed, no driver, or no GPU.
    """
    cudart = _cudart()
    if cudart is not None:
        try:
            count = cudart.cudaGetDeviceCount()
        except Exception as exc:  # the driver library is missing behind the bindings
            raise TensorRTUnavailable(f"no NVIDIA driver: cuda-python cannot query devices ({exc})",
                                      hint=CUDA_HINT) from None
        if int(count[0]) != 0 or int(count[1]) == 0:
            raise TensorRTUnavailable("no NVIDIA GPU visible to CUDA (cudaGetDeviceCount found none)", hint=CUDA_HINT)
        if device >= int(count[1]):
            raise TensorRTUnavailable(f"GPU {device} requested; CUDA sees {int(count[1])}", hint=None)
        return CudaPython(cudart, device)
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise TensorRTUnavailable("neither cuda-python nor PyTorch is installed to reach the GPU",
                                  hint=CUDA_HINT) from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no NVIDIA GPU visible (torch.cuda.is_available() is False and cuda-python is "
                                  "not installed)", hint=CUDA_HINT)
    return TorchCuda(torch, device)
