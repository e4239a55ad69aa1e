"""Torch-free inference: numpy + onnxruntime (TensorRT in a later step) behind one runner
interface, batch prediction over image files, and benchmarking."""

from ctmask.runtime.batch_run import predict_files
from ctmask.runtime.predict import Prediction, PredictionWriter, collect_images
from ctmask.runtime.runner import OnnxRuntimeRunner, Runner, onnxruntime_devices

__all__ = [
    "OnnxRuntimeRunner",
    "Prediction",
    "PredictionWriter",
    "Runner",
    "collect_images",
    "onnxruntime_devices",
    "predict_files",
]
