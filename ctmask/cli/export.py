"""``export``: the ONNX graph at any precision, a TensorRT engine, a Triton model repository.

``export`` writes the FP32 graph, or its FP16 / INT8 form (:func:`_export_graph_only`); with
``--engine tensorrt`` a TensorRT engine, from a checkpoint after its graph passed parity
(:func:`_export_engine`); with ``--triton-repo`` also the Triton models, or it only packages an
existing graph or engine (:func:`_package_only`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import typer

from ctmask.cli.common import JsonOpt, QuietOpt, check_paths, emit_json, human_echo, split_images, user_errors
from ctmask.cli.precision import MeasureOpt, MethodOpt, ResidualOpt, SizeOpt, TargetOpt

CalibrationOpt = typer.Option(None, "--calibration", help="INT8 ranges: a ranges file from `ctmask calibrate` (no "
                                                          "calibration runs), or slices to calibrate on: a folder, "
                                                          "a COVIDx-CT split file or a `ctmask synth` folder (its "
                                                          "training split). FP16 and INT8 measure their FP32 "
                                                          "islands on these slices.")
CheckpointArg = typer.Argument(..., metavar="CKPT_OR_ONNX",
                               help="Classifier checkpoint (from train-cls); with --engine, also a ctmask ONNX graph; "
                                    "with --triton-repo alone, a ctmask ONNX graph or engine to package as it is.")
ExportOutOpt = typer.Option(None, "--out", "-o", help="ONNX file to write (with --engine: the engine, .engine). "
                                                      "Required, except when --triton-repo packages an existing graph "
                                                      "or engine (then it is refused: nothing but the repository is "
                                                      "written).")
PrecisionOpt = typer.Option(None, "--precision", help="fp32 | fp16 | int8 (default fp32; an engine from an ONNX "
                                                      "graph: the graph's own).")
IslandsOpt = typer.Option(None, "--islands", help="Reuse the FP32 islands of a precision report (written beside an "
                                                  "earlier export, or by `ctmask precision-report`) instead of "
                                                  "measuring.")
Fp32BlocksOpt = typer.Option(None, "--fp32-blocks", help="Explicit FP32 islands, comma-separated block names ('none' "
                                                         "for none): an experiment, recorded as not measured.")
OpsetOpt = typer.Option(18, help="ONNX opset: 18 up to the newest the installed onnx package knows; an opset the "
                                 "exporter cannot produce is refused.")
EngineOpt = typer.Option(None, "--engine", help="tensorrt: build a TensorRT engine (NVIDIA GPU, pip install "
                                                "'ctmask[trt]'); from a checkpoint, the ONNX graph is exported beside "
                                                "it and proven first.")
TimingCacheOpt = typer.Option(None, "--timing-cache", help="TensorRT timing cache: read if it exists, saved after the "
                                                           "build.")
ParityImagesOpt = typer.Option(None, "--images", help="Slices or folders for the parity check that proves the ONNX "
                                                      "graph before an engine is built from a checkpoint "
                                                      "(repeatable).")
TritonRepoOpt = typer.Option(None, "--triton-repo", help="Also put the graph (model NAME, onnxruntime_onnx) and the "
                                                         "engine (model NAME_trt, tensorrt_plan) into this Triton "
                                                         "model repository (created if missing; pip install "
                                                         "'ctmask[triton]').")
TritonNameOpt = typer.Option(None, "--triton-name", help="Triton model name (default: the stem of --out, or of the "
                                                         "packaged file, with characters outside A-Z a-z 0-9 _ . - "
                                                         "made _).")
TritonMaxBatchOpt = typer.Option(None, "--triton-max-batch", help="max_batch_size (default 32 for the graph; an "
                                                                  "engine's batch profile MAX, which it may not "
                                                                  "exceed).")
TritonKindOpt = typer.Option("gpu", "--triton-kind", help="gpu | cpu: where the graph's instances run (an engine: gpu "
                                                          "only).")
TritonDelayOpt = typer.Option(500, "--triton-delay-us", help="Dynamic batcher's max_queue_delay_microseconds.")


@dataclass(frozen=True)
class GraphOptions:
    """How ``export`` makes the ONNX graph (alone, or the one an engine is built from)."""

    calibration: Path | None = None
    int8_target: str | None = None
    islands: Path | None = None
    fp32_blocks: str | None = None
    calibration_size: int = 64
    measure_size: int = 200
    method: str | None = None
    opset: int = 18
    residual: str | None = None


@dataclass(frozen=True)
class EngineOptions:
    """How ``export --engine tensorrt`` builds the engine (and proves the graph it exports)."""

    batch: str = "1,8,32"
    workspace: float = 4.0
    timing_cache: Path | None = None
    images: list[Path] | None = None
    parity_size: int = 64


def _blocks(value: str | None) -> tuple[str, ...] | None:
    """``--fp32-blocks``: None (not given), else :func:`~ctmask.exporter.reduced.parse_fp32_blocks`."""
    from ctmask.exporter.reduced import parse_fp32_blocks

    return None if value is None else parse_fp32_blocks(value)


@user_errors
def export(
    checkpoint: Path = CheckpointArg,
    out: Path | None = ExportOutOpt,
    precision: str | None = PrecisionOpt,
    calibration: Path | None = CalibrationOpt,
    int8_target: str | None = TargetOpt,
    residual: str | None = ResidualOpt,
    islands: Path | None = IslandsOpt,
    fp32_blocks: str | None = Fp32BlocksOpt,
    calibration_size: int = SizeOpt,
    measure_size: int = MeasureOpt,
    method: str | None = MethodOpt,
    opset: int = OpsetOpt,
    engine: str | None = EngineOpt,
    batch: str = typer.Option("1,8,32", "--batch", help="Engine batch profile MIN,OPT,MAX."),
    workspace: float = typer.Option(4.0, "--workspace", help="Engine builder workspace limit, GB."),
    timing_cache: Path | None = TimingCacheOpt,
    images: list[Path] | None = ParityImagesOpt,
    parity_size: int = typer.Option(64, "--parity-size", min=1, help="Slices of --images the parity check uses."),
    triton_repo: Path | None = TritonRepoOpt,
    triton_name: str | None = TritonNameOpt,
    triton_max_batch: int | None = TritonMaxBatchOpt,
    triton_instances: int = typer.Option(1, "--triton-instances", help="Model instances (instance_group count)."),
    triton_kind: str = TritonKindOpt,
    triton_delay_us: int = TritonDelayOpt,
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Export detector + S to one ONNX graph: images [B,1,S,S] -> rois [B,N,5], logits, probs, boxes, labels.

    `--precision fp16` keeps FP32 islands where a per-block measurement shows class calls move; `--precision
    int8` adds Q/DQ from calibrated ranges (saved beside the graph as `<name>.ranges.json`; pass that file to
    `--calibration` next time and nothing is calibrated again). The measurement is saved as
    `<name>.precision.json`. Inputs and outputs stay float32 at every precision.

    `--engine tensorrt` builds a TensorRT engine (strongly typed: the precision is the graph's) with its
    sidecar `<name>.engine.json`, after `check-trt` finds nothing fatal. From a checkpoint, the graph is
    exported to `<name>.onnx` and parity against PyTorch on `--images` must pass first.

    `--triton-repo DIR` also writes a Triton Inference Server model repository: `DIR/NAME/config.pbtxt`,
    `labels.txt` and `DIR/NAME/<version>/model.onnx` for the graph, and `DIR/NAME_trt/<version>/model.plan` for
    an engine. Version 1 for a new model; the same file again with the same options changes nothing; another
    file of the same contract becomes the next version; anything else is refused before a file is written.
    `ctmask export GRAPH.onnx --triton-repo DIR` (or `ENGINE.engine`, with its sidecar) only packages that
    file: no --out, nothing exported. Check a repository with `ctmask check-triton DIR`.
    """
    from ctmask.core.errors import ConfigError
    from ctmask.trt.engine import is_engine_path

    triton = _triton_options(triton_repo, triton_name, triton_max_batch, triton_instances, triton_kind,
                             triton_delay_us)
    graph = GraphOptions(calibration, int8_target, islands, fp32_blocks, calibration_size, measure_size, method, opset,
                         residual)
    build = EngineOptions(batch, workspace, timing_cache, images, parity_size)
    packaged = checkpoint.suffix.lower() == ".onnx" or is_engine_path(checkpoint)
    if triton is not None and engine is None and packaged:
        return _package_only(checkpoint, out, precision, graph, build, triton, json_out)
    if engine is None and packaged:
        raise ConfigError(f"{checkpoint} is an ONNX graph or engine already; export takes a checkpoint (with "
                          "--engine tensorrt, it builds an engine from a graph; with --triton-repo DIR, it packages "
                          "the file for Triton)")
    if out is None:
        raise ConfigError("--out is required: the file to export to (only packaging an existing graph or engine "
                          "with --triton-repo writes none)")
    if engine is not None:
        return _export_engine(checkpoint, out, engine, precision, build, graph, json_out, quiet, triton)
    _export_graph_only(checkpoint, out, precision or "fp32", graph, build, triton, json_out, quiet)


def _package_only(checkpoint: Path, out: Path | None, precision: str | None, graph: GraphOptions,
                  build: EngineOptions, triton: dict, json_out: Path | None) -> None:
    """``export GRAPH.onnx|ENGINE --triton-repo DIR``: refuses the export options, then packages the file."""
    from ctmask.core.errors import ConfigError
    from ctmask.trt.engine import sidecar_path

    given = [n for n, v in (("--out", out), ("--precision", precision), ("--calibration", graph.calibration),
                            ("--int8-target", graph.int8_target), ("--residual", graph.residual),
                            ("--islands", graph.islands),
                            ("--fp32-blocks", graph.fp32_blocks), ("--method", graph.method),
                            ("--timing-cache", build.timing_cache)) if v is not None]
    given += [n for n, v, d in (("--calibration-size", graph.calibration_size, 64), ("--measure-size",
                                graph.measure_size, 200), ("--opset", graph.opset, 18), ("--batch", build.batch,
                                "1,8,32"), ("--workspace", build.workspace, 4.0), ("--parity-size", build.parity_size,
                                64)) if v != d]
    given += ["--images"] if build.images else []
    if given:
        raise ConfigError(f"{checkpoint} is packaged into {triton['repo']} as it is: {', '.join(given)} "
                          f"appl{'ies' if len(given) == 1 else 'y'} when exporting from a checkpoint or "
                          "building an engine")
    check_paths({"CKPT_OR_ONNX": checkpoint, "its sidecar": sidecar_path(checkpoint)}, {"--json": json_out},
                {"--triton-repo": triton["repo"]})
    _package(checkpoint, triton, json_out)


def _export_graph_only(checkpoint: Path, out: Path, precision: str, graph: GraphOptions, build: EngineOptions,
                       triton: dict | None, json_out: Path | None, quiet: bool) -> None:
    """``export CKPT --out F.onnx``: the graph (and its Triton model with --triton-repo)."""
    from ctmask.core.errors import ConfigError

    engine_only = [n for n, v in (("--timing-cache", build.timing_cache), ("--images", build.images)) if v]
    engine_only += [n for n, v, d in (("--batch", build.batch, "1,8,32"), ("--workspace", build.workspace, 4.0))
                    if v != d]
    if engine_only:
        raise ConfigError(f"{', '.join(engine_only)} only apply to --engine tensorrt")
    check_paths({"CKPT_OR_ONNX": checkpoint, "--calibration": graph.calibration,
                 "its slices": split_images(graph.calibration), "--islands": graph.islands},
                {"--out": out, **_graph_sidecars(out, precision, graph), "--json": json_out},
                {"--triton-repo": None if triton is None else triton["repo"]})
    if triton is not None:
        triton["name"] = triton["name"] or _default_name(out)
        _check_triton_destination(triton, graph=True, engine=False)
    result, summary = _export_graph(checkpoint, out, precision, graph, quiet)
    echo = human_echo(json_out)
    _echo_graph(result, summary, echo)
    extra = {"triton": _write_triton(triton, out, None, echo)} if triton is not None else {}
    emit_json(result.to_dict() | ({"precision_summary": summary} if summary else {}) | extra, json_out)


def _graph_sidecars(out: Path, precision: str, graph: GraphOptions) -> dict[str, Path]:
    """The files an export writes beside the graph ``out`` (:func:`ctmask.exporter.reduced.export_reduced`)."""
    from ctmask.exporter.reduced import is_ranges_file, sidecar

    files = {}
    if precision == "int8" and not (graph.calibration is not None and is_ranges_file(graph.calibration)):
        files["the ranges file beside --out"] = sidecar(out, "ranges")
    if precision in ("fp16", "int8") and graph.islands is None and graph.fp32_blocks is None:
        files["the precision report beside --out"] = sidecar(out, "precision")
    return files


def _triton_options(repo: Path | None, name: str | None, max_batch: int | None, instances: int, kind: str,
                    delay_us: int) -> dict | None:
    """The --triton-* options checked (None without --triton-repo); tritonclient is imported here,
    before anything is written."""
    from ctmask.core.errors import ConfigError

    if repo is None:
        given = [n for n, v, d in (("--triton-name", name, None), ("--triton-max-batch", max_batch, None),
                                   ("--triton-instances", instances, 1), ("--triton-kind", kind, "gpu"),
                                   ("--triton-delay-us", delay_us, 500)) if v != d]
        if given:
            raise ConfigError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --triton-repo "
                              "DIR")
        return None
    from ctmask.scale.triton_schema import MAX_BATCH, check_name

    if name is not None:
        check_name(name)
    if max_batch is not None and not 1 <= max_batch <= MAX_BATCH:
        raise ConfigError(f"--triton-max-batch must be in 1..{MAX_BATCH}, got {max_batch}")
    if not 1 <= instances <= 1024:
        raise ConfigError(f"--triton-instances must be in 1..1024, got {instances}")
    if kind not in ("gpu", "cpu"):
        raise ConfigError(f"--triton-kind must be gpu or cpu, got {kind!r}")
    if not 0 <= delay_us <= 60_000_000:
        raise ConfigError(f"--triton-delay-us must be in 0..60000000 (a minute), got {delay_us}")
    return {"repo": repo, "name": name, "max_batch": max_batch, "instances": instances, "kind": kind,
            "delay_us": delay_us}


def _default_name(path: Path) -> str:
    from ctmask.scale.triton_schema import triton_model_name

    return triton_model_name(path.stem)


def _check_triton_destination(triton: dict, graph: bool, engine: bool) -> None:
    from ctmask.scale.triton_schema import ENGINE_SUFFIX
    from ctmask.scale.triton_write import check_destination

    check_destination(triton["repo"], [triton["name"]] * graph + [triton["name"] + ENGINE_SUFFIX] * engine)


def _write_triton(triton: dict, graph: Path | None, engine: Path | None, echo) -> dict:
    from ctmask.scale.triton_write import write_triton_repo

    summary = write_triton_repo(triton["repo"], triton["name"], graph, engine, max_batch=triton["max_batch"],
                                instances=triton["instances"], kind=triton["kind"],
                                max_queue_delay_us=triton["delay_us"], version=None)
    for m in summary["models"]:
        state = "unchanged (already there)" if m["status"] == "unchanged" else "wrote"
        echo(f"triton: {state} model {m['model']} version {m['version']} ({m['platform']}, max_batch_size "
             f"{m['max_batch_size']}, preferred {m['preferred_batch_size']}): {m['file']}")
        for note in m["notes"]:
            echo(f"  note: {note}")
    return summary


def _package(source: Path, triton: dict, json_out: Path | None) -> None:
    """``export GRAPH.onnx|ENGINE --triton-repo DIR``: the file packaged as it is."""
    from ctmask.trt.engine import is_engine_path

    triton["name"] = triton["name"] or _default_name(source)
    is_engine = is_engine_path(source)
    summary = _write_triton(triton, None if is_engine else source, source if is_engine else None,
                            human_echo(json_out))
    emit_json({"triton": summary}, json_out)


def _export_graph(checkpoint: Path, out: Path, precision: str, graph: GraphOptions, quiet: bool):
    """The ONNX graph at ``precision`` (and the reduced-precision summary, or None)."""
    from ctmask.core.errors import ConfigError
    from ctmask.core.progress import console

    if precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"unknown --precision {precision!r}; expected fp32, fp16 or int8")
    for flag, value in (("--int8-target", graph.int8_target), ("--residual", graph.residual)):
        if precision != "int8" and value is not None:
            raise ConfigError(f"{flag} applies to --precision int8, not {precision}")
    if precision == "fp32":
        given = [n for n, v in (("--calibration", graph.calibration), ("--islands", graph.islands),
                                ("--fp32-blocks", graph.fp32_blocks), ("--method", graph.method)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --precision fp16 or int8")
        from ctmask.exporter.onnx_export import export_onnx

        with console.status(f"exporting {checkpoint} (torch.onnx.export, dynamo=True)"):
            return export_onnx(checkpoint, out, graph.opset), None
    from ctmask.exporter.reduced import ReducedOptions, export_reduced

    opts = ReducedOptions(precision, graph.calibration, graph.int8_target or "tensorrt", graph.islands,
                          _blocks(graph.fp32_blocks), graph.calibration_size, graph.measure_size,
                          graph.method or "minmax", residual=graph.residual)
    with console.status(f"exporting {checkpoint} at {precision}") as status:
        return export_reduced(checkpoint, out, opts, graph.opset,
                              on_step=None if quiet else lambda s: status.update(f"{precision}: {s}"))


def _echo_graph(result, summary: dict | None, echo) -> None:
    spec = result.spec
    echo(f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, {result.n_nodes} nodes, opset {spec.opset}, "
         f"{spec.precision}) in {result.seconds:.1f} s")
    echo(f"  preset {spec.preset}: images [B, 1, {spec.image_size}, {spec.image_size}] -> rois [B, "
         f"{spec.n_rois}, 5], logits [B, 3], probs [B, 3], boxes [B, {spec.n_rois}, 4], labels [B, {spec.n_rois}]; "
         "checker (full_check) passed"
         + ("; slices body-cropped (crop boxes needed at inference)" if spec.crop else ""))
    if summary is not None:
        echo(format_summary(summary))


def _export_engine(source: Path, out: Path, engine: str, precision: str | None, build: EngineOptions,
                   graph: GraphOptions, json_out: Path | None, quiet: bool, triton: dict | None = None) -> None:
    """``export --engine tensorrt``: TensorRT and the GPU are checked before anything is written."""
    from ctmask.core.progress import console
    from ctmask.trt.api import require_tensorrt
    from ctmask.trt.build import BuildOptions, build_engine
    from ctmask.trt.cuda import open_cuda

    echo = human_echo(json_out)
    profile = _engine_profile(engine, out, build, triton)
    from_graph = source.suffix.lower() == ".onnx"
    _check_engine_source(source, out, precision, from_graph, build, graph, triton, json_out)
    require_tensorrt()  # before anything is written: TensorRT and a GPU must be here
    open_cuda().close()
    options = BuildOptions(profile, build.workspace, build.timing_cache, precision if from_graph else None)
    summary: dict = {"engine": str(out)}
    onnx = source if from_graph else _prove_graph(source, out.with_suffix(".onnx"), precision, build, graph, quiet,
                                                  echo, summary)
    with console.status(f"building a TensorRT engine from {onnx}") as status:
        info = build_engine(onnx, out, options, on_step=None if quiet else lambda s: status.update(f"tensorrt: {s}"))
    spec = info.spec
    echo(f"wrote {out} ({info.plan_bytes / 2**20:.1f} MiB, {spec.precision}, TensorRT {info.tensorrt_version}, "
         f"{info.gpu_name} sm {info.compute_capability}, batch {profile.min}-{profile.max}) in "
         f"{info.build_seconds:.1f} s, and its sidecar {out}.json")
    if triton is not None:
        summary["triton"] = _write_triton(triton, onnx, out, echo)
    emit_json(summary | info.to_dict(), json_out)


def _engine_profile(engine: str, out: Path, build: EngineOptions, triton: dict | None):
    """The engine options checked (and the Triton destination of the graph and the engine): the batch profile."""
    from ctmask.core.errors import ConfigError
    from ctmask.trt.engine import BatchProfile, is_engine_path

    if engine != "tensorrt":
        raise ConfigError(f"unknown --engine {engine!r}; expected tensorrt")
    if not is_engine_path(out):
        raise ConfigError(f"--out {out} must name an engine file (.engine, .plan or .trt)")
    profile = BatchProfile.parse(build.batch)
    if not 0 < build.workspace <= 1024:  # also refuses nan
        raise ConfigError(f"--workspace must be a number of GB in (0, 1024], got {build.workspace}")
    timing_cache = build.timing_cache
    if timing_cache is not None and (timing_cache.is_dir() or not timing_cache.parent.is_dir()):
        raise ConfigError(f"--timing-cache {timing_cache} must name a file in an existing folder")
    if triton is not None:  # the repository takes the graph and the engine: refused now, not after the build
        if triton["kind"] != "gpu":
            raise ConfigError("--triton-kind cpu: a TensorRT engine runs on a GPU only (KIND_GPU)")
        if triton["max_batch"] is not None and triton["max_batch"] > profile.max:
            raise ConfigError(f"--triton-max-batch {triton['max_batch']} is above the engine's --batch MAX "
                              f"{profile.max}: TensorRT refuses larger batches")
        if profile.min > 1:
            raise ConfigError(f"--batch {build.batch}: an engine for Triton needs MIN 1 (its dynamic batcher sends "
                              "batches from 1 up)")
        triton["name"] = triton["name"] or _default_name(out)
        _check_triton_destination(triton, graph=True, engine=True)
    return profile


def _check_engine_source(source: Path, out: Path, precision: str | None, from_graph: bool, build: EngineOptions,
                         graph: GraphOptions, triton: dict | None, json_out: Path | None) -> None:
    """The source of an engine and the files it writes: a graph takes no export options; a
    checkpoint needs --images for its parity check; no output over an input."""
    from ctmask.core.errors import ConfigError
    from ctmask.trt.engine import sidecar_path

    if from_graph:
        given = ["--" + f.name.replace("_", "-") for f in fields(graph)
                 if getattr(graph, f.name) is not None and f.name not in ("opset", "calibration_size", "measure_size")]
        given += ["--images"] if build.images else []
        if given:
            raise ConfigError(f"{source} is an ONNX graph already: {', '.join(given)} apply when exporting from a "
                              "checkpoint")
    elif not build.images:
        raise ConfigError("building an engine from a checkpoint proves its ONNX graph against PyTorch first: pass "
                          "--images DIR (slices for the parity check), or export the graph, check it with `ctmask "
                          "parity`, and build from the ONNX file")
    graph_out = out.with_suffix(".onnx")
    graph_files = {} if from_graph else {"the graph beside --out": graph_out,
                                         **_graph_sidecars(graph_out, precision or "fp32", graph)}
    check_paths({"CKPT_OR_ONNX": source, "--images": build.images, "--calibration": graph.calibration,
                 "its slices": split_images(graph.calibration), "--islands": graph.islands},
                {"--out": out, "the engine's sidecar": sidecar_path(out), **graph_files,
                 "--timing-cache": build.timing_cache, "--json": json_out},
                {"--triton-repo": triton and triton["repo"]})
    if not source.is_file():
        raise ConfigError(f"{source} does not exist")


def _prove_graph(checkpoint: Path, graph_out: Path, precision: str | None, build: EngineOptions,
                 graph: GraphOptions, quiet: bool, echo, summary: dict) -> Path:
    """The graph an engine is built from a checkpoint: exported, then proven against PyTorch on
    --images (its parity in ``summary``)."""
    from ctmask.backends.parity import check_parity
    from ctmask.core.errors import EngineError
    from ctmask.core.progress import console

    result, reduced = _export_graph(checkpoint, graph_out, precision or "fp32", graph, quiet)
    _echo_graph(result, reduced, echo)
    with console.status(f"parity of {graph_out} against PyTorch"):
        report = check_parity(checkpoint, graph_out, list(build.images or []), build.parity_size)
    echo(f"parity of {graph_out}: {'PASSED' if report['passed'] else 'FAILED'} (class agreement "
         f"{report['argmax_agreement']:.2%} on {report['n_images']} slices)")
    summary["onnx"] = str(graph_out)
    summary["parity"] = {k: report[k] for k in ("passed", "argmax_agreement", "n_images", "failures")}
    if not report["passed"]:
        raise EngineError("the exported graph failed parity against PyTorch; no engine was built: "
                          + ", ".join(report["failures"]), graph_out,
                          hint=f"ctmask parity {checkpoint} {graph_out} --images ... shows the details")
    return graph_out


def format_summary(summary: dict) -> str:
    lines = [f"  reduced to {summary['precision']}: {', '.join(summary['reduced_blocks']) or 'nothing'}"]
    for block, why in sorted(summary["fp32_islands"].items()):
        lines.append(f"  FP32 island {block}: {why}")
    cal = summary.get("calibration")
    if cal:
        lines.append(f"  calibration: {cal['method']} on {cal['slices']} slices, "
                     + ("calibrated now" if summary["calibrated"] else f"ranges reused from {cal['from']} "
                                                                        "(no calibration ran)"))
    if "weights" in summary:
        w = summary["weights"]
        lines.append(f"  weights: {w['float16']:,} float16, {w['float32']:,} float32 elements")
    if "qdq" in summary:
        q = summary["qdq"]
        lines.append(f"  Q/DQ ({summary['int8_target']}): {q['quantize_linear']} QuantizeLinear, "
                     f"{q['dequantize_linear']} DequantizeLinear; activations {q['activation_types']}, "
                     f"zero-points {_zero_points(q)}; "
                     f"weights {q['weight_types']}; residual paths read {summary.get('residual', 'float')}")
    final = (summary.get("sensitivity") or {}).get("final")
    if final:
        lines.append(f"  measured on {final['n']} slices against the FP32 graph: {final['changed_calls']} class "
                     f"call(s) changed, max |dlogit| {final['max_abs_logits']:.3g}")
    for note in summary.get("notes", []):
        lines.append(f"  note: {note}")
    for kind, path in summary["files"].items():
        if kind != "graph":
            lines.append(f"  wrote {kind.replace('_', ' ')} {path}")
    return "\n".join(lines)


COMMANDS = {"export": export}


def _zero_points(q: dict) -> str:
    """The activation zero-points in words: symmetric int8, the QAT grid in uint8, or asymmetric."""
    if q["activation_zero_points_all_zero"]:
        return "all 0"
    if q["activation_zero_points"] == [128]:
        return "all 128 (a symmetric grid in uint8: the QAT scales)"
    return "asymmetric"
