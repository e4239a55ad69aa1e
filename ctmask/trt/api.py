"""Loading TensorRT and CUDA, and what differs between TensorRT 10.x and 11.x.

Written against the TensorRT Python API of 10.x (type-checked with ``tensorrt-stubs``
10.13) and the 10.x -> 11.x migration guide; this project's CI has no GPU and no
libnvinfer, so only the parts that need neither run there (the version plan, the error
messages). Where 10.x and 11.x differ, the difference is data in :class:`ApiPlan`, so the
branching itself is unit-tested.

The differences that matter to ctmask:

* **Typing.** ctmask hands TensorRT graphs whose precision is in the ONNX file (FP16
  tensors, explicit Q/DQ), so every build is strongly typed. 10.x needs the
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` creation flag; 11.x removed weak typing
  and is strongly typed with no flag. Neither gets ``BuilderFlag.FP16`` / ``INT8``
  (forbidden on a strongly typed 10.x network, removed in 11.x).
* **Plugins.** The ONNX parser maps ``RoiAlign`` to the ``ROIAlign_TRT`` plugin (version 2,
  IPluginV3, since 10.1) of ``libnvinfer_plugin``: :func:`init_plugins` registers it before
  parsing (builder) and before deserialising (runtime), in both majors.
* **Device memory queries** (``ICudaEngine.device_memory_size*``) are removed in 11.x; ctmask
  lets the execution context allocate its own memory and reads usage from CUDA instead.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctmask.core.errors import TensorRTUnavailable

if TYPE_CHECKING:
    import tensorrt as trt

SUPPORTED_MAJORS = (10, 11)


@dataclass(frozen=True)
class TrtVersion:
    """A TensorRT version string split into numbers (``"10.13.0.35"`` -> 10, 13, 0)."""

    text: str
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> TrtVersion:
        """Parse ``tensorrt.__version__``.

        Raises:
            TensorRTUnavailable: not a version string, or a major ctmask does not build for.
        """
        m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
        if m is None:
            raise TensorRTUnavailable(f"cannot read the TensorRT version {text!r}")
        version = cls(str(text).strip(), int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
        if version.major not in SUPPORTED_MAJORS:
            raise TensorRTUnavailable(
                f"TensorRT {version.text} is installed; ctmask builds and runs engines with TensorRT "
                f"{' or '.join(f'{v}.x' for v in SUPPORTED_MAJORS)}",
                hint="pip install 'ctmask[trt]' (which pins tensorrt>=10,<12)")
        return version

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ApiPlan:
    """What ctmask does differently on each TensorRT major (see the module docstring).

    Attributes:
        major: 10 or 11.
        strongly_typed_flag: pass ``1 << STRONGLY_TYPED`` to ``create_network`` (10.x);
            11.x takes no flag (strong typing is the only mode).
    """

    major: int
    strongly_typed_flag: bool

    @classmethod
    def for_version(cls, version: TrtVersion) -> ApiPlan:
        if version.major == 10:
            return cls(10, True)
        if version.major == 11:
            return cls(11, False)
        raise TensorRTUnavailable(f"no API plan for TensorRT {version}")

    def network_flags(self) -> int:
        """The ``create_network`` flags of a strongly typed network."""
        if self.strongly_typed_flag:
            import tensorrt as trt

            return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return 0


def require_tensorrt() -> TrtVersion:
    """Check that the real TensorRT imports, and return its version.

    Callers then ``import tensorrt as trt`` themselves, so mypy checks every call they make
    against ``tensorrt-stubs``. ``tensorrt-stubs`` installs a ``tensorrt`` folder holding
    only ``.pyi`` files, which Python imports as an empty namespace package: that counts as
    missing, with its own message.

    Raises:
        TensorRTUnavailable: not installed, only the stubs, a broken install (libnvinfer
            not found), or an unsupported major.
    """
    try:
        module = importlib.import_module("tensorrt")
    except ImportError as exc:  # ModuleNotFoundError, or libnvinfer*.so missing behind the bindings
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise TensorRTUnavailable(f"TensorRT is not installed (import tensorrt: {detail})") from None
    except OSError as exc:
        raise TensorRTUnavailable(f"TensorRT is installed but its libraries cannot be loaded ({exc})") from None
    if not hasattr(module, "Builder") or getattr(module, "__file__", None) is None:
        raise TensorRTUnavailable("only the TensorRT type stubs (tensorrt-stubs) are installed, not TensorRT itself")
    return TrtVersion.parse(getattr(module, "__version__", "?"))


_PLUGINS_READY: list[bool] = []


def init_plugins(logger: trt.ILogger) -> None:
    """Register ``libnvinfer_plugin``'s creators (``ROIAlign_TRT`` for ``RoiAlign``) once.

    Raises:
        TensorRTUnavailable: the plugin library cannot be loaded.
    """
    import tensorrt as trt

    if _PLUGINS_READY:
        return
    if not trt.init_libnvinfer_plugins(logger, ""):
        raise TensorRTUnavailable("TensorRT's plugin library (libnvinfer_plugin) could not be initialised: the "
                                  "graph's RoiAlign needs its ROIAlign_TRT plugin")
    _PLUGINS_READY.append(True)


def make_logger(verbose: bool = False) -> trt.Logger:
    """A TensorRT logger at WARNING (or VERBOSE)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
