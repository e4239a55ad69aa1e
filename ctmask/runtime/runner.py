"""Runners: one small interface over every inference backend (numpy in, numpy out).

``activate()`` builds what is heavy (a session, an engine) once; ``infer(feed)`` runs a
batch and may be called any number of times; ``deactivate()`` frees it. A runner is also
a context manager. Backends implement the ``*_impl`` hooks. Nothing here imports torch.
"""

from __future__ import annotations

import abc
import warnings
from pathlib import Path

import numpy as np

from ctmask.core.errors import ConfigError, ModelError
from ctmask.core.spec import INPUT, GraphSpec


class Runner(abc.ABC):
    """Base class of inference backends.

    Attributes:
        name: backend label used in reports, e.g. ``onnxruntime-cpu``.
    """

    name: str = "runner"

    def __init__(self) -> None:
        self.is_active = False
        self._spec: GraphSpec | None = None

    @property
    def spec(self) -> GraphSpec:
        """The graph spec of the model (available once active)."""
        if self._spec is None:
            raise RuntimeError(f"{self.name}: activate() the runner before asking for its spec")
        return self._spec

    def activate(self) -> Runner:
        if not self.is_active:
            self._spec = self.activate_impl()
            self.is_active = True
        return self

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            feed: ``{"images": float32 [B, 1, S, S]}`` in [0, 1].

        Returns:
            ``{"rois": [B, N, 5], "logits": [B, 3], "probs": [B, 3], "boxes": [B, N, 4]}``
            (:data:`ctmask.core.spec.OUTPUTS`; ``labels`` [B, N] too where the graph has it), float32.
        """
        if not self.is_active:
            raise RuntimeError(f"{self.name}: call activate() before infer()")
        images = feed[INPUT]
        want = self.spec.input_shape(images.shape[0] if images.ndim else 0)
        if images.dtype != np.float32 or images.shape != want:
            raise ValueError(f"{self.name}: expected float32 {list(want)} for {INPUT!r}, got {images.dtype} "
                             f"{list(images.shape)}")
        return self.infer_impl(feed)

    def infer_batches(self, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        """:meth:`infer` over ``images`` [M, 1, S, S] in batches of ``batch_size``, outputs concatenated."""
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), batch_size):
            for k, v in self.infer({INPUT: np.ascontiguousarray(images[start:start + batch_size])}).items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def describe(self) -> dict:
        """What really runs: backend, device / provider, threads (after activation)."""
        return {"backend": self.name}

    def memory_report(self) -> dict:
        """Backend-specific memory figures (e.g. device memory), measured while active."""
        return {}

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abc.abstractmethod
    def activate_impl(self) -> GraphSpec: ...

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def deactivate_impl(self) -> None: ...


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
OPT_LEVELS = ("disable", "basic", "extended", "all")


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime backend.

    Args:
        path: ctmask ONNX file.
        device: "cpu" or "cuda" (onnxruntime-gpu; silently falls back to the CPU when CUDA
            cannot be used, which :meth:`describe` reports).
        threads: intra-op threads (default: onnxruntime's choice, the physical cores).
        optimization: graph optimisation level, one of :data:`OPT_LEVELS`.
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all"):
        super().__init__()
        if device not in PROVIDERS:
            raise ConfigError(f"unknown onnxruntime device {device!r}; expected one of {sorted(PROVIDERS)}")
        if optimization not in OPT_LEVELS:
            raise ConfigError(f"unknown optimisation level {optimization!r}; expected one of {list(OPT_LEVELS)}")
        self.path = Path(path)
        self.device = device
        self.threads = threads
        self.optimization = optimization
        self.name = f"onnxruntime-{device}"
        self.session = None

    def activate_impl(self) -> GraphSpec:
        import onnxruntime as ort

        if not self.path.is_file():
            raise ModelError("model file does not exist", self.path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or 0
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        opts.log_severity_level = 3
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the CUDA fallback is reported by describe()
                self.session = ort.InferenceSession(str(self.path), opts, providers=PROVIDERS[self.device])
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
            raise ModelError(f"not a loadable ONNX model ({first})", self.path) from None
        spec = GraphSpec.from_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        names = [o.name for o in self.session.get_outputs()]
        if [i.name for i in self.session.get_inputs()] != [INPUT] or names != list(spec.outputs):
            raise ModelError(f"graph inputs/outputs are {[i.name for i in self.session.get_inputs()]} -> {names}, "
                             f"expected [{INPUT!r}] -> {list(spec.outputs)}", self.path)
        types = {t.name: t.type for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        wrong = {k: v for k, v in types.items() if v != "tensor(float)"}
        if wrong:
            raise ModelError(f"graph inputs/outputs must be float32 at every precision; found {wrong}", self.path)
        spec.check_shapes({t.name: t.shape for t in (*self.session.get_inputs(), *self.session.get_outputs())},
                          self.path)
        return spec

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(list(self.spec.outputs), {INPUT: feed[INPUT]})
        return dict(zip(self.spec.outputs, values))

    def deactivate_impl(self) -> None:
        self.session = None

    @property
    def provider(self) -> str:
        """The execution provider that runs the graph (the first one the session kept)."""
        return self.session.get_providers()[0] if self.session is not None else ""

    def describe(self) -> dict:
        d = {"backend": self.name, "model": str(self.path), "threads": self.threads or "default",
             "optimization": self.optimization, "requested_provider": PROVIDERS[self.device][0]}
        if self.session is not None:
            d["provider"] = self.provider
            d["fell_back_to_cpu"] = self.device == "cuda" and self.provider != "CUDAExecutionProvider"
        return d


def onnxruntime_devices() -> list[str]:
    """Devices this onnxruntime build can run on ("cpu", plus "cuda" for onnxruntime-gpu)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in available else [])
