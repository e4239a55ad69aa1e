"""OpenVINO backend (CPU): the same ctmask ONNX file, read by OpenVINO's ONNX frontend.

OpenVINO is an optional dependency (``pip install 'ctmask[openvino]'``), imported only when
a runner is activated. The graph's batch axis stays dynamic: one compiled model serves
every batch size. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctmask.core.errors import ConfigError, ModelError
from ctmask.core.spec import INPUT, GraphSpec
from ctmask.runtime.runner import Runner

HINTS = ("f32", "bf16")
"""Inference precision hints: ``f32`` (the default, matches onnxruntime within ctmask's FP32
tolerances) and ``bf16`` (for benchmarks only: it changes class calls)."""

INSTALL_HINT = "pip install 'ctmask[openvino]'"

# Layers whose runtime precision tells what the hint really did (the compute-heavy ones).
_HEAVY_LAYERS = ("Convolution", "FullyConnected", "MatMul")


def import_openvino():
    """The ``openvino`` module.

    Raises:
        ConfigError: OpenVINO is not installed (or cannot be imported), with the install command.
    """
    try:
        import openvino
    except ImportError as exc:
        raise ConfigError(f"the openvino backend needs OpenVINO, which cannot be imported ({exc})",
                          hint=INSTALL_HINT) from None
    return openvino


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__


class OpenVinoRunner(Runner):
    """OpenVINO backend on the CPU.

    Args:
        path: ctmask ONNX file.
        threads: inference threads (default: OpenVINO's choice).
        hint: inference precision hint, one of :data:`HINTS`. ``bf16`` runs convolutions and
            fully connected layers in bfloat16 where the CPU supports it; it is for
            benchmark reports only (it changes class calls on ctmask models).
    """

    def __init__(self, path: str | Path, threads: int | None = None, hint: str = "f32"):
        super().__init__()
        if hint not in HINTS:
            raise ConfigError(f"unknown OpenVINO precision hint {hint!r}; expected one of {list(HINTS)}")
        if threads is not None and threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: OpenVINO's choice), got {threads}")
        self.path = Path(path)
        self.threads = threads or None
        self.hint = hint
        self.name = "openvino-cpu" if hint == "f32" else f"openvino-{hint}"
        self.compiled = None
        self._request = None
        self._outputs: dict[str, object] = {}
        self._device: dict = {}
        self._compiled_info: dict = {}

    def activate_impl(self) -> GraphSpec:
        ov = import_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        if not self.path.is_file():
            raise ModelError("model file does not exist", self.path)
        from ctmask.core.graphs import read_spec

        spec = read_spec(self.path)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO raises RuntimeError / its own types
            raise ModelError(f"OpenVINO cannot read the model ({_first_line(exc)})", self.path) from None
        inputs = [i.get_any_name() for i in model.inputs]
        outputs = [o.get_any_name() for o in model.outputs]
        if inputs != [INPUT] or outputs != list(spec.outputs):
            raise ModelError(f"graph inputs/outputs are {inputs} -> {outputs}, expected [{INPUT!r}] -> "
                             f"{list(spec.outputs)}", self.path)
        shape = model.inputs[0].get_partial_shape()
        want = spec.input_shape(1)[1:]
        if (shape.rank.is_dynamic or len(shape) != 4 or shape[0].is_static
                or any(d.is_dynamic or d.get_length() != w for d, w in zip(list(shape)[1:], want))):
            raise ModelError(f"input {INPUT!r} has shape {shape}, expected [?, {', '.join(map(str, want))}] "
                             "(dynamic batch)", self.path)
        config = {hints.inference_precision: getattr(ov.Type, self.hint),
                  hints.performance_mode: hints.PerformanceMode.LATENCY}
        if self.threads:
            config[props.inference_num_threads] = self.threads
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise ModelError(f"OpenVINO cannot compile the model for the CPU ({_first_line(exc)})",
                             self.path) from None
        self._request = self.compiled.create_infer_request()
        self._outputs = {name: self.compiled.output(name) for name in spec.outputs}
        self._device = self._device_info(core, props)
        self._compiled_info = self._inspect_compiled(props, hints)
        return spec

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self._request.infer({INPUT: feed[INPUT]})  # outputs are copies (share_outputs=False)
        return {name: np.asarray(result[port], dtype=np.float32) for name, port in self._outputs.items()}

    def deactivate_impl(self) -> None:
        self._request = None
        self._outputs = {}
        self.compiled = None

    @staticmethod
    def _device_info(core, props) -> dict:
        info = {}
        for key, prop in (("device_name", props.device.full_name),
                          ("optimization_capabilities", props.device.capabilities)):
            try:
                value = core.get_property("CPU", prop)
            except Exception:  # a property this OpenVINO build does not expose
                continue
            info[key] = list(value) if isinstance(value, (list, tuple)) else str(value)
        return info

    def _inspect_compiled(self, props, hints) -> dict:
        """What the compiled model really does: effective precision hint, threads, and the
        runtime precision of its compute-heavy layers."""
        info = {}
        for key, prop in (("inference_precision", hints.inference_precision),
                          ("inference_threads", props.inference_num_threads)):
            try:
                value = self.compiled.get_property(prop)
            except Exception:
                continue
            info[key] = value.get_type_name() if hasattr(value, "get_type_name") else value
        try:
            layers: dict[str, set[str]] = {}
            for op in self.compiled.get_runtime_model().get_ordered_ops():
                rt = op.get_rt_info()
                if "layerType" not in rt or "runtimePrecision" not in rt:
                    continue
                kind = rt["layerType"].astype(str)
                if kind in _HEAVY_LAYERS:
                    layers.setdefault(kind, set()).add(rt["runtimePrecision"].astype(str))
            if layers:
                info["execution_precision"] = {k: "+".join(sorted(v)) for k, v in sorted(layers.items())}
        except Exception:  # the runtime-model introspection differs between OpenVINO releases
            pass
        return info

    def describe(self) -> dict:
        d = {"backend": self.name, "model": str(self.path), "threads": self.threads or "default",
             "precision_hint": self.hint, "device": "CPU"}
        try:
            import openvino

            d["openvino"] = openvino.__version__
        except ImportError:
            pass
        return d | self._device | self._compiled_info
