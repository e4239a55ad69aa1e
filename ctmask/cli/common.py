"""Shared pieces of the ``ctmask`` commands: error handling, JSON output, common options."""

from __future__ import annotations

import errno
import functools
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from ctmask.core.errors import CtmaskError, CtmaskWarning

# Optional dependencies: the module whose absence means the package is not installed -> (the
# ctmask extra that installs it, what it is). `pip install ctmask` is the torch-free runtime; a
# command that needs one of these names the extra.
EXTRA_OF_MODULE: dict[str, tuple[str, str]] = {
    "torch": ("train", "PyTorch"),
    "torchvision": ("train", "torchvision"),
    "onnxscript": ("train", "onnxscript"),
    "onnx_ir": ("train", "onnx-ir"),
    "safetensors": ("train", "safetensors"),
    "onnxconverter_common": ("train", "onnxconverter-common"),
    "openvino": ("openvino", "OpenVINO"),
    "tensorrt": ("trt", "TensorRT"),
    "cuda": ("trt", "cuda-python"),
    "cuda.bindings": ("trt", "cuda-python"),  # `cuda` can be a namespace other NVIDIA packages fill
    "ray": ("ray", "Ray"),
    "pyarrow": ("ray", "pyarrow"),
    "tritonclient": ("triton", "tritonclient"),
    "google.protobuf": ("triton", "protobuf"),
    "dicomweb_client": ("pacs", "dicomweb-client"),
    "pynetdicom": ("pacs", "pynetdicom"),
}


ENVIRONMENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EFBIG", "EACCES", "EPERM", "EROFS", "ENOTDIR", "EISDIR", "EEXIST", "ENAMETOOLONG", "EIO",
    "EPIPE", "EMFILE", "ENFILE") if hasattr(errno, name))
"""OS errors that are the machine's state, not ctmask's bug (disk full, permissions, a path
that is a file, stdout closed): printed as one line, exit 2."""


def missing_extra(exc: ModuleNotFoundError, command: str) -> str | None:
    """The message for a command that needs an extra which is not installed, or None when
    ``exc`` is not about one: another module, or a submodule of an installed package such as
    ``torch._C`` (a broken install or a bug, which keeps its traceback)."""
    name = exc.name or ""
    if name not in EXTRA_OF_MODULE:
        return None
    extra, what = EXTRA_OF_MODULE[name]
    return f"`ctmask {command}` needs {what} ({name} is not installed): pip install 'ctmask[{extra}]'"


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print :class:`CtmaskError`, an optional dependency that is not installed (with the extra
    to install), or an OS error of :data:`ENVIRONMENT_ERRNOS` (disk full, permission denied: the
    file named), without a traceback and exit 2; bugs keep theirs."""
    command = fn.__name__.replace("_", "-")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CtmaskError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as exc:
            message = missing_extra(exc, command)
            if message is None:
                raise
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise  # a bug, or something to debug: keep the traceback
            where = exc.filename if exc.filename is not None else "output"
            what = exc.strerror or str(exc) or exc.__class__.__name__
            typer.secho(f"error: {where}: {what}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def json_to_stdout(path: Path | None) -> bool:
    """True when ``--json -`` asks for the JSON on stdout."""
    return path is not None and str(path) == "-"


def human_echo(json_path: Path | None) -> Callable[..., None]:
    """``typer.echo`` for a command's human-readable output.

    With ``--json -`` stdout carries the JSON alone, so the human output goes to stderr.
    """
    to_stderr = json_to_stdout(json_path)

    def echo(message: str = "", **kwargs: Any) -> None:
        typer.echo(message, err=to_stderr or kwargs.pop("err", False), **kwargs)

    return echo


def show_ctmask_warnings() -> None:
    """Print :class:`CtmaskWarning` as one ``warning: ...`` line on stderr (no source line);
    other warnings keep Python's format. Each one is shown every time it occurs."""
    warnings.simplefilter("always", CtmaskWarning)
    default = warnings.showwarning
    if getattr(default, "ctmask", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CtmaskWarning):
            typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
        else:
            default(message, category, filename, lineno, file, line)

    show.ctmask = True
    warnings.showwarning = show


def emit_json(obj: Any, path: Path | None) -> None:
    """Write ``obj`` as JSON to ``path`` (atomically), or to stdout when ``path`` is '-'."""
    if path is None:
        return
    if str(path) == "-":
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        return
    from ctmask.core.fileio import write_json_atomic

    write_json_atomic(path, obj)
    typer.echo(f"wrote {path}", err=True)


def check_paths(inputs: dict[str, Any], outputs: dict[str, Any], folders: dict[str, Any] | None = None,
                slice_folders: bool = True) -> Any:
    """:func:`ctmask.core.outputs.check_outputs` for a command: every output against every input
    and against each other, before any work (exit 2). An existing file inside an input folder is
    an input when the readers would take it as a slice (an image, DICOM or NIfTI file), or, for
    a command whose input folders are no folders of slices (``slice_folders=False``), always. The
    sidecar of a checkpoint or an engine input (``<file>.json``) is an input too."""
    from ctmask.core.outputs import check_outputs

    return check_outputs({**inputs, **input_sidecars(inputs)}, outputs, folders,
                         is_input_file=_read_as_slice if slice_folders else None)


def input_sidecars(inputs: dict[str, Any]) -> dict[str, list[Path]]:
    """The sidecars of the checkpoints and TensorRT engines among ``inputs`` (``cls.pt`` ->
    ``cls.pt.json``, ``m.engine`` -> ``m.engine.json``), by the input's name."""
    from ctmask.backends.registry import CHECKPOINT_SUFFIXES
    from ctmask.trt.engine import ENGINE_SUFFIXES, SIDECAR_SUFFIX

    sidecars: dict[str, list[Path]] = {}
    for name, value in inputs.items():
        values = [value] if isinstance(value, (str, Path)) else list(value or [])
        for v in values:
            if v is not None and str(v) not in ("", "-") and Path(v).suffix.lower() in (*CHECKPOINT_SUFFIXES,
                                                                                          *ENGINE_SUFFIXES):
                sidecars.setdefault(f"{name}'s sidecar", []).append(Path(str(v) + SIDECAR_SUFFIX))
    return sidecars


def split_images(path: Path | None) -> list[Path]:
    """The slices a COVIDx-CT split file names (inputs too), or [] for anything else (a folder,
    a ranges file, a file that is not a split: its own command reports that)."""
    if path is None or path.suffix.lower() != ".txt" or not path.is_file():
        return []
    from ctmask.core.errors import CtmaskError
    from ctmask.data.covidx import read_split

    try:
        return [e.path for e in read_split(path, check_exists=False)]
    except (CtmaskError, OSError, ValueError):
        return []


def _read_as_slice(path: Path) -> bool:
    from ctmask.scans.listing import probe_file
    from ctmask.scans.types import FileTask

    probe = probe_file(FileTask(str(path), path.name, explicit=False))
    return bool(probe.slices or probe.dicom or probe.failure)


PresetOpt = typer.Option("small", "--preset", "-p",
                         help="Model preset: small, paper, paper-merge, resnet18-t1 or resnet34-t1.")
JsonOpt = typer.Option(None, "--json", help="Write results as JSON to this file ('-' for stdout).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")


@dataclass(frozen=True)
class SharedOption:
    """An option several commands take (``infer``, ``serve``, ``bench-serve``): its name, default,
    bound and help declared once; a command where it means a little more words its own help."""

    default: Any
    name: str
    help: str
    min: int | None = None

    def option(self, help: str | None = None, bounded: bool = True) -> Any:
        """The command's ``typer.Option`` (``help``: the command's own wording; ``bounded=False``:
        no ``min``, the command checks the value itself)."""
        return typer.Option(self.default, self.name, help=help or self.help, min=self.min if bounded else None)


BACKEND = SharedOption("auto", "--backend", "auto | onnxruntime | openvino | tensorrt | torch (auto: by the model "
                                            "file: .engine runs on TensorRT (GPU, pip install 'ctmask[trt]'); "
                                            "openvino: CPU only, pip install 'ctmask[openvino]').")
DEVICE = SharedOption("cpu", "--device", "cpu | cuda.")
THREADS = SharedOption(None, "--threads", "CPU threads (default: the backend's own choice).")
TOP_ROIS = SharedOption(5, "--top-rois", "RoI rows kept per slice in the output; also the lesion detections drawn "
                        "on overlays and written to DICOM.", min=1)
FORCE_MODALITY = SharedOption(False, "--force-modality", "Predict DICOM of a modality other than CT (off the "
                                                         "model's training distribution).")
HU_OFFSET = SharedOption(1024.0, "--hu-offset", "16-bit PNG / TIFF slices hold HU + this offset.")
UNCROPPED = SharedOption(False, "--uncropped", "Run a model trained on cropped slices on whole slices anyway (off "
                                               "its training distribution).")
