"""TensorRT deployment: the GPU-free graph check (``check-trt``), engine build and runner."""
