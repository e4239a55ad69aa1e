"""The runner for a model file: :func:`make_runner` picks the backend (shared by ``infer``,
``infer --ray`` actors and ``serve`` replicas). Nothing here imports torch; a checkpoint's
runner imports it when built."""

from __future__ import annotations

from pathlib import Path

from ctmask.core.errors import ConfigError
from ctmask.runtime.runner import Runner

CHECKPOINT_SUFFIXES = (".pt", ".pth")


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
        from ctmask.runtime.runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model, device=device, threads=threads)
    if backend == "openvino":
        if device != "cpu":
            raise ConfigError(f"the openvino backend runs on the CPU only; got --device {device}")
        from ctmask.runtime.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(model, threads=threads)
    if backend == "torch":
        from ctmask.exporter.reference import TorchRunner

        return TorchRunner(model, device=device, threads=threads)
    raise ConfigError(f"unknown backend {backend!r}; expected auto, onnxruntime, openvino, tensorrt or torch")
