"""User-facing errors, warnings and check findings: every type of them, in one place.

Every error a user can cause (a bad file, a wrong option, a checkpoint of another preset)
is a :class:`CtmaskError`. The CLI prints it without a traceback and exits non-zero; any
other exception is a bug and keeps its traceback. The subclasses say which part of the
work failed; callers that map errors to something else (HTTP status codes, exit codes) do
it by type, never by message text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class CtmaskError(Exception):
    """Base class of errors caused by input, not by a bug.

    Args:
        message: what was expected and what was found.
        path: the offending file, if any; it is named first in ``str(err)``.
        hint: how to fix it, if known.
    """

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = None if path is None else Path(path)
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path is not None else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class DataError(CtmaskError):
    """An input file (image, mask, split file) is missing, unreadable or malformed."""


class TooLargeError(DataError):
    """An input declares more than a limit allows (a slice side past the maximum, a raster image
    Pillow counts as a decompression bomb), refused before it is decoded (``ctmask serve``: 413)."""


class UnsupportedFileError(DataError):
    """An input that is no image, DICOM or NIfTI file at all (``ctmask serve``: 415)."""


class CheckpointError(CtmaskError):
    """A checkpoint is missing, unreadable or does not match the requested model."""


class ConfigError(CtmaskError):
    """An option or preset name is invalid."""


OUTPUT_PATH_HINT = ("give every output a path of its own: not an input, not another output, not inside a folder "
                    "the command fills")
TENSORRT_INSTALL_HINT = ("on a machine with an NVIDIA GPU and driver: pip install 'ctmask[trt]' (TensorRT 10.x or "
                         "11.x and cuda-python)")


class OutputPathError(ConfigError):
    """An output path that would overwrite an input or another output, or that cannot be the
    file or folder it is asked to be."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message, path, hint=OUTPUT_PATH_HINT)


class ModelError(CtmaskError):
    """A model file is missing, not ONNX, or not a ctmask graph."""


class ExportError(CtmaskError):
    """The exported graph does not meet the graph contract."""


class PrecisionError(CtmaskError):
    """A reduced-precision graph could not be made as asked."""


class RangesError(DataError):
    """A ranges file is unreadable, malformed or made for another graph."""


class EngineError(CtmaskError):
    """An engine file or its sidecar is missing, malformed, or does not fit this machine."""


class TensorRTUnavailable(CtmaskError):
    """TensorRT, CUDA or an NVIDIA GPU is missing or unusable (the CLI exits 2, nothing written)."""

    def __init__(self, message: str, hint: str | None = TENSORRT_INSTALL_HINT):
        super().__init__(message, hint=hint)


class RayError(CtmaskError):
    """The Ray job could not run (no cluster at ``--address``, actors that cannot load the model)."""


class ServerError(CtmaskError):
    """A server that does not answer (``bench-serve --url``, or one that did not start)."""


class PacsError(CtmaskError):
    """A PACS that cannot be reached, refuses the association or the credentials, or answers
    a DICOMweb / DIMSE request with an error (``infer --dicomweb``, ``listen``)."""


class CtmaskWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it
    as one ``warning:`` line on stderr)."""


FATAL, WARNING, INFO = "fatal", "warning", "info"
SEVERITIES = (FATAL, WARNING, INFO)


@dataclass(frozen=True)
class Finding:
    """One problem a check found, in one of two places: a node of a graph (``check-trt``: what
    TensorRT will demand of it) or a file of a folder (``check-triton``: what Triton will
    refuse).

    Attributes:
        message: what is wrong (and what is wanted instead).
        severity: ``fatal``, ``warning`` or ``info``.
        node, op: the ONNX node's name (a graph input / output name, or ``<graph>``) and op
            type (``graph input``, ``graph output``, ``opset``, ``INT64``), for a graph.
        path, line: the file and its line, for a folder.
    """

    message: str
    severity: str = FATAL
    node: str | None = None
    op: str | None = None
    path: str | None = None
    line: int | None = None

    @property
    def in_graph(self) -> bool:
        return self.node is not None

    def to_dict(self) -> dict:
        if self.in_graph:
            return {"severity": self.severity, "node": self.node, "op": self.op, "message": self.message}
        return {"path": self.path, "line": self.line, "message": self.message}

    def __str__(self) -> str:
        if self.in_graph:
            return f"{self.severity.upper()} {self.node} ({self.op}): {self.message}"
        return f"{self.path}{f':{self.line}' if self.line else ''}: {self.message}"
