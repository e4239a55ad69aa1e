"""TensorRT engine files: the sidecar that says what an engine is, and the checks that
refuse one built for another TensorRT, GPU or ctmask graph contract.

A ctmask engine is two files: ``model.engine``, TensorRT's own serialised plan (untouched,
so ``trtexec`` and Triton's ``tensorrt_plan`` backend load it as is), and
``model.engine.json``, its sidecar: format, ctmask version, TensorRT version, GPU name and
compute capability, the ONNX file's sha256 (and its content hash), the graph spec
(precision, N, input size, classes ...: the ONNX's own ``ctmask.*`` metadata), the
optimisation profile, and the plan's sha256 binding the two. Nothing here needs TensorRT:
it all runs in CI.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ctmask import __version__
from ctmask.core.errors import ConfigError, CtmaskError, EngineError
from ctmask.core.spec import FORMAT as GRAPH_FORMAT
from ctmask.core.spec import GraphSpec

ENGINE_FORMAT = "ctmask-trt-engine/1"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
SIDECAR_SUFFIX = ".json"
MAX_PROFILE_BATCH = 4096
REBUILD_HINT = "rebuild the engine: ctmask export MODEL.onnx --engine tensorrt --out ENGINE"


def sidecar_path(engine: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def is_engine_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in ENGINE_SUFFIXES


@dataclass(frozen=True)
class BatchProfile:
    """The one optimisation profile of the batch dimension: min <= opt <= max."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """``"1,8,32"`` (or one number ``"8"``: 1, 8, 8).

        Raises:
            ConfigError: not 1 or 3 positive integers in order, or above :data:`MAX_PROFILE_BATCH`.
        """
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--batch takes MIN,OPT,MAX (e.g. 1,8,32) or one batch size; got {text!r}") from None
        if len(values) == 1:
            values = [1, values[0], values[0]]
        if len(values) != 3:
            raise ConfigError(f"--batch takes three numbers MIN,OPT,MAX; got {text!r}")
        lo, opt, hi = values
        if not 1 <= lo <= opt <= hi:
            raise ConfigError(f"--batch {text!r}: need 1 <= MIN <= OPT <= MAX")
        if hi > MAX_PROFILE_BATCH:
            raise ConfigError(f"--batch {text!r}: MAX above {MAX_PROFILE_BATCH} slices is not supported")
        return cls(lo, opt, hi)

    def shapes(self, spec: GraphSpec) -> dict[str, tuple[int, ...]]:
        """min / opt / max shapes of the ``images`` input."""
        return {k: tuple(int(d) for d in spec.input_shape(b)) for k, b in
                (("min", self.min), ("opt", self.opt), ("max", self.max))}

    def chunks(self, batch: int) -> list[tuple[int, int, int]]:
        """Split a batch of ``batch`` slices into engine calls: ``(start, stop, run)``
        where ``run`` (>= ``min``) is the batch the engine runs; ``run - (stop - start)``
        rows of padding when a remainder is below ``min``."""
        if batch < 1:
            return []
        out = []
        for start in range(0, batch, self.max):
            stop = min(start + self.max, batch)
            out.append((start, stop, max(stop - start, self.min)))
        return out

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class EngineInfo:
    """The sidecar of an engine (see the module docstring)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_sha256: str
    onnx_content_sha256: str
    graph_metadata: dict[str, str]
    profile: BatchProfile
    plan_sha256: str
    plan_bytes: int
    ctmask_version: str = __version__
    workspace_gb: float | None = None
    timing_cache: str | None = None
    build_seconds: float | None = None
    onnx_file: str = ""
    plugins: tuple[str, ...] = ()
    check_findings: tuple[str, ...] = ()

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec.from_metadata(self.graph_metadata, self.onnx_file or "engine sidecar")

    def to_dict(self) -> dict:
        spec = self.spec
        return {
            "format": ENGINE_FORMAT,
            "ctmask_version": self.ctmask_version,
            "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability},
            "onnx": {"file": self.onnx_file, "sha256": self.onnx_sha256, "content_sha256": self.onnx_content_sha256},
            "precision": spec.precision,
            "n_rois": spec.n_rois,
            "input_size": spec.image_size,
            "profile": self.profile.to_dict(),
            "plan": {"sha256": self.plan_sha256, "bytes": self.plan_bytes},
            "build": {"workspace_gb": self.workspace_gb, "timing_cache": self.timing_cache,
                      "seconds": self.build_seconds, "plugins": list(self.plugins),
                      "check_trt": list(self.check_findings)},
            "graph_metadata": dict(self.graph_metadata),
        }

    @classmethod
    def from_dict(cls, d: dict, path: str | Path) -> EngineInfo:
        """Read a sidecar dict.

        Raises:
            EngineError: another format, or missing / malformed fields (naming ``path``).
        """
        if not isinstance(d, dict) or d.get("format") != ENGINE_FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise EngineError(f"not a ctmask engine sidecar (format {found!r}, expected {ENGINE_FORMAT!r})", path)
        try:
            prof = d["profile"]
            info = cls(
                tensorrt_version=str(d["tensorrt_version"]),
                gpu_name=str(d["gpu"]["name"]),
                compute_capability=str(d["gpu"]["compute_capability"]),
                onnx_sha256=str(d["onnx"]["sha256"]),
                onnx_content_sha256=str(d["onnx"].get("content_sha256", "")),
                graph_metadata={str(k): str(v) for k, v in d["graph_metadata"].items()},
                profile=BatchProfile(int(prof["min"]), int(prof["opt"]), int(prof["max"])),
                plan_sha256=str(d["plan"]["sha256"]),
                plan_bytes=int(d["plan"]["bytes"]),
                ctmask_version=str(d.get("ctmask_version", "")),
                workspace_gb=d.get("build", {}).get("workspace_gb"),
                timing_cache=d.get("build", {}).get("timing_cache"),
                build_seconds=d.get("build", {}).get("seconds"),
                onnx_file=str(d["onnx"].get("file", "")),
                plugins=tuple(d.get("build", {}).get("plugins", ())),
                check_findings=tuple(d.get("build", {}).get("check_trt", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EngineError(f"malformed engine sidecar ({exc.__class__.__name__}: {exc})", path,
                              hint=REBUILD_HINT) from None
        problems = []
        if not 1 <= info.profile.min <= info.profile.opt <= info.profile.max <= MAX_PROFILE_BATCH:
            problems.append(f"profile {info.profile.to_dict()} is not 1 <= min <= opt <= max <= {MAX_PROFILE_BATCH}")
        if not isinstance(d.get("tensorrt_version"), str) or not re.match(r"^\d+\.\d+", d["tensorrt_version"]):
            problems.append(f"tensorrt_version {d.get('tensorrt_version')!r} is not a version")
        if not re.fullmatch(r"[0-9a-f]{64}", info.plan_sha256) or info.plan_bytes < 1:
            problems.append("the plan's sha256 or size is malformed")
        if problems:
            raise EngineError("malformed engine sidecar: " + "; ".join(problems), path, hint=REBUILD_HINT)
        return info


def read_sidecar(engine: str | Path) -> EngineInfo:
    """The sidecar of ``engine``, its graph spec checked against this ctmask.

    Raises:
        EngineError: the engine or its sidecar is missing, unreadable or malformed, or its
            graph contract is not the one this ctmask reads.
    """
    engine = Path(engine)
    side = sidecar_path(engine)
    rebuild = f"rebuild it: ctmask export MODEL.onnx --engine tensorrt --out {engine}"
    if not engine.is_file():
        raise EngineError("engine file does not exist", engine)
    if not side.is_file():
        raise EngineError(f"no sidecar {side.name} beside the engine: ctmask cannot tell which TensorRT, GPU and "
                          "graph it was built for", engine, hint=rebuild)
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"unreadable engine sidecar ({exc.__class__.__name__}: {exc})", side, hint=rebuild) from None
    except RecursionError:  # json recurses once per nesting level
        raise EngineError("unreadable engine sidecar (JSON nested too deeply)", side, hint=rebuild) from None
    info = EngineInfo.from_dict(data, side)
    fmt = info.graph_metadata.get("ctmask.format")
    if fmt != GRAPH_FORMAT:
        raise EngineError(f"engine built from a graph of format {fmt!r}; this ctmask reads {GRAPH_FORMAT!r}", engine,
                          hint=rebuild)
    try:
        spec = info.spec
        spec.tolerances  # noqa: B018  (a precision ctmask has parity tolerances for)
    except CtmaskError as exc:
        raise EngineError(f"engine sidecar's graph metadata: {exc.message}", side, hint=rebuild) from None
    if not (16 <= spec.image_size <= 8192 and 1 <= spec.n_rois <= 100_000 and len(spec.class_names) >= 2):
        raise EngineError(f"engine sidecar's graph metadata is malformed (input size {spec.image_size}, N "
                          f"{spec.n_rois}, {len(spec.class_names)} classes)", side, hint=rebuild)
    return info


def plan_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_plan(info: EngineInfo, plan: bytes, engine: str | Path) -> None:
    """Refuse a plan that is not the one the sidecar describes (edited, truncated, swapped)."""
    if len(plan) != info.plan_bytes or plan_sha256(plan) != info.plan_sha256:
        raise EngineError(f"engine file ({len(plan):,} bytes) is not the plan its sidecar describes "
                          f"({info.plan_bytes:,} bytes, sha256 {info.plan_sha256[:12]}...): it changed after the build",
                          engine, hint=f"rebuild it: ctmask export MODEL.onnx --engine tensorrt --out {engine}")


def mismatches(info: EngineInfo, tensorrt_version: str, gpu_name: str, compute_capability: str) -> list[str]:
    """What about this machine differs from the one the engine was built for.

    A TensorRT plan runs only with the TensorRT release that built it (ctmask does not
    build version-compatible plans) and on GPUs of the same compute capability (no
    hardware-compatibility mode); a different GPU model of the same capability runs it,
    possibly slower, so that is reported by the runner as a warning, not here.
    """
    problems = []
    if info.tensorrt_version != tensorrt_version:
        problems.append(f"TensorRT {info.tensorrt_version} built it, this machine has TensorRT {tensorrt_version}")
    if info.compute_capability != compute_capability:
        problems.append(f"it was built for {info.gpu_name} (compute capability {info.compute_capability}), this "
                        f"GPU is {gpu_name} (compute capability {compute_capability})")
    return problems


def check_compatible(info: EngineInfo, engine: str | Path, tensorrt_version: str, gpu_name: str,
                     compute_capability: str) -> None:
    """Raise :class:`EngineError` naming each mismatch and how to rebuild."""
    problems = mismatches(info, tensorrt_version, gpu_name, compute_capability)
    if problems:
        onnx = info.onnx_file or "MODEL.onnx"
        raise EngineError("engine does not fit this machine: " + "; ".join(problems), engine,
                          hint=f"rebuild it here from the same graph: ctmask export {onnx} --engine tensorrt "
                               f"--batch {info.profile.min},{info.profile.opt},{info.profile.max} --out {engine}")


def write_engine(engine: str | Path, plan: bytes, info: EngineInfo) -> None:
    """Write the sidecar, then the plan, each atomically; on any failure neither is left.

    The sidecar goes first so a plan never exists without its description; a crash
    between the two leaves a sidecar whose plan is missing, which :func:`read_sidecar`
    reports as "engine file does not exist".
    """
    from ctmask.core.fileio import write_bytes_atomic, write_json_atomic

    engine = Path(engine)
    side = sidecar_path(engine)
    if plan_sha256(plan) != info.plan_sha256 or len(plan) != info.plan_bytes:
        raise ValueError("EngineInfo does not describe this plan")
    old_side = side.read_bytes() if side.is_file() else None
    write_json_atomic(side, info.to_dict())
    try:
        write_bytes_atomic(engine, plan)
    except BaseException:
        if old_side is None:
            side.unlink(missing_ok=True)
        else:
            write_bytes_atomic(side, old_side)
        raise
