"""Export at any precision, calibration and the per-block sensitivity report.

``export`` writes the FP32 graph, or its FP16 / INT8 form; ``calibrate`` measures the
activation ranges of an FP32 graph into a ranges file; ``precision-report`` measures what
running each block in reduced precision does to the class calls.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ctmask.cli.common import JsonOpt, QuietOpt, check_paths, emit_json, human_echo, split_images, user_errors

CalibrationOpt = typer.Option(None, "--calibration", help="INT8 ranges: a ranges file from `ctmask calibrate` (no "
                                                          "calibration runs), or slices to calibrate on: a folder, "
                                                          "a COVIDx-CT split file or a `ctmask synth` folder (its "
                                                          "training split). FP16 and INT8 measure their FP32 "
                                                          "islands on these slices.")
SizeOpt = typer.Option(64, "--calibration-size", min=1, help="Calibration slices, drawn class-balanced where "
                                                             "labels exist.")
MeasureOpt = typer.Option(200, "--measure-size", min=1, help="Slices the FP32 islands are measured on (drawn "
                                                             "like the calibration slices): 200 lets 0.5% be one "
                                                             "changed call. With a ranges file, its own slices.")
MethodOpt = typer.Option(None, "--method", help="Calibration method: minmax (default) | entropy | percentile.")
TargetOpt = typer.Option(None, "--int8-target", help="Q/DQ flavour: tensorrt (int8 symmetric activations, "
                                                           "zero-point 0) or cpu (uint8 activations: onnxruntime's "
                                                           "fast x86 form). Default: tensorrt.")


def _blocks(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(b.strip() for b in value.split(",") if b.strip() and b.strip() != "none")


@user_errors
def export(
    checkpoint: Path = typer.Argument(..., metavar="CKPT_OR_ONNX",
                                      help="Classifier checkpoint (from train-cls); with --engine, also a ctmask "
                                           "ONNX graph; with --triton-repo alone, a ctmask ONNX graph or engine "
                                           "to package as it is."),
    out: Path | None = typer.Option(None, "--out", "-o", help="ONNX file to write (with --engine: the engine, "
                                                              ".engine). Required, except when --triton-repo "
                                                              "packages an existing graph or engine (then it is "
                                                              "refused: nothing but the repository is written)."),
    precision: str | None = typer.Option(None, "--precision", help="fp32 | fp16 | int8 (default fp32; an engine "
                                                                   "from an ONNX graph: the graph's own)."),
    calibration: Path | None = CalibrationOpt,
    int8_target: str | None = TargetOpt,
    islands: Path | None = typer.Option(None, "--islands", help="Reuse the FP32 islands of a precision report "
                                                                "(written beside an earlier export, or by "
                                                                "`ctmask precision-report`) instead of measuring."),
    fp32_blocks: str | None = typer.Option(None, "--fp32-blocks", help="Explicit FP32 islands, comma-separated "
                                                                       "block names ('none' for none): an "
                                                                       "experiment, recorded as not measured."),
    calibration_size: int = SizeOpt,
    measure_size: int = MeasureOpt,
    method: str | None = MethodOpt,
    opset: int = typer.Option(18, help="ONNX opset: 18 up to the newest the installed onnx package knows; an "
                                       "opset the exporter cannot produce is refused."),
    engine: str | None = typer.Option(None, "--engine", help="tensorrt: build a TensorRT engine (NVIDIA GPU, pip "
                                                             "install 'ctmask[trt]'); from a checkpoint, the ONNX "
                                                             "graph is exported beside it and proven first."),
    batch: str = typer.Option("1,8,32", "--batch", help="Engine batch profile MIN,OPT,MAX."),
    workspace: float = typer.Option(4.0, "--workspace", help="Engine builder workspace limit, GB."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="TensorRT timing cache: read if it "
                                                                          "exists, saved after the build."),
    images: list[Path] | None = typer.Option(None, "--images", help="Slices or folders for the parity check that "
                                                                    "proves the ONNX graph before an engine is "
                                                                    "built from a checkpoint (repeatable)."),
    parity_size: int = typer.Option(64, "--parity-size", min=1, help="Slices of --images the parity check uses."),
    triton_repo: Path | None = typer.Option(None, "--triton-repo", help="Also put the graph (model NAME, "
                                                                        "onnxruntime_onnx) and the engine (model "
                                                                        "NAME_trt, tensorrt_plan) into this Triton "
                                                                        "model repository (created if missing; pip "
                                                                        "install 'ctmask[triton]')."),
    triton_name: str | None = typer.Option(None, "--triton-name", help="Triton model name (default: the stem of "
                                                                       "--out, or of the packaged file, with "
                                                                       "characters outside A-Z a-z 0-9 _ . - made "
                                                                       "_)."),
    triton_max_batch: int | None = typer.Option(None, "--triton-max-batch", help="max_batch_size (default 32 for "
                                                                                 "the graph; an engine's batch "
                                                                                 "profile MAX, which it may not "
                                                                                 "exceed)."),
    triton_instances: int = typer.Option(1, "--triton-instances", help="Model instances (instance_group count)."),
    triton_kind: str = typer.Option("gpu", "--triton-kind", help="gpu | cpu: where the graph's instances run "
                                                                 "(an engine: gpu only)."),
    triton_delay_us: int = typer.Option(500, "--triton-delay-us", help="Dynamic batcher's "
                                                                       "max_queue_delay_microseconds."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Export detector + S to one ONNX graph: images [B,1,S,S] -> rois [B,N,5], logits, probs, boxes [B,N,4].

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
    packaged = checkpoint.suffix.lower() == ".onnx" or is_engine_path(checkpoint)
    if triton is not None and engine is None and packaged:
        given = [n for n, v in (("--out", out), ("--precision", precision), ("--calibration", calibration),
                                ("--int8-target", int8_target), ("--islands", islands),
                                ("--fp32-blocks", fp32_blocks), ("--method", method),
                                ("--timing-cache", timing_cache)) if v is not None]
        given += [n for n, v, d in (("--calibration-size", calibration_size, 64), ("--measure-size", measure_size,
                                    200), ("--opset", opset, 18), ("--batch", batch, "1,8,32"),
                                    ("--workspace", workspace, 4.0), ("--parity-size", parity_size, 64)) if v != d]
        given += ["--images"] if images else []
        if given:
            raise ConfigError(f"{checkpoint} is packaged into {triton_repo} as it is: {', '.join(given)} "
                              f"appl{'ies' if len(given) == 1 else 'y'} when exporting from a checkpoint or "
                              "building an engine")
        from ctmask.trt.engine import sidecar_path

        check_paths({"CKPT_OR_ONNX": checkpoint, "its sidecar": sidecar_path(checkpoint)}, {"--json": json_out},
                    {"--triton-repo": triton_repo})
        _package(checkpoint, triton, json_out)
        return
    if engine is None and packaged:
        raise ConfigError(f"{checkpoint} is an ONNX graph or engine already; export takes a checkpoint (with "
                          "--engine tensorrt, it builds an engine from a graph; with --triton-repo DIR, it packages "
                          "the file for Triton)")
    if out is None:
        raise ConfigError("--out is required: the file to export to (only packaging an existing graph or engine "
                          "with --triton-repo writes none)")
    if engine is not None:
        _export_engine(checkpoint, out, engine, precision, batch, workspace, timing_cache, images, parity_size,
                       json_out, quiet, dict(calibration=calibration, int8_target=int8_target, islands=islands,
                                             fp32_blocks=fp32_blocks, calibration_size=calibration_size,
                                             measure_size=measure_size, method=method, opset=opset), triton)
        return
    engine_only = [n for n, v in (("--timing-cache", timing_cache), ("--images", images)) if v]
    engine_only += [n for n, v, d in (("--batch", batch, "1,8,32"), ("--workspace", workspace, 4.0)) if v != d]
    if engine_only:
        raise ConfigError(f"{', '.join(engine_only)} only apply to --engine tensorrt")
    check_paths({"CKPT_OR_ONNX": checkpoint, "--calibration": calibration, "its slices": split_images(calibration),
                 "--islands": islands},
                {"--out": out, **_graph_sidecars(out, precision or "fp32", calibration, islands, fp32_blocks),
                 "--json": json_out}, {"--triton-repo": triton_repo})
    if triton is not None:
        triton["name"] = triton["name"] or _default_name(out)
        _check_triton_destination(triton, graph=True, engine=False)
    result, summary = _export_graph(checkpoint, out, precision or "fp32", calibration, int8_target, islands,
                                    fp32_blocks, calibration_size, measure_size, method, opset, quiet)
    echo = human_echo(json_out)
    _echo_graph(result, summary, echo)
    extra = {"triton": _write_triton(triton, out, None, echo)} if triton is not None else {}
    emit_json(result.to_dict() | ({"precision_summary": summary} if summary else {}) | extra, json_out)


def _graph_sidecars(out: Path, precision: str, calibration: Path | None, islands: Path | None,
                    fp32_blocks: str | None) -> dict[str, Path]:
    """The files an export writes beside the graph ``out`` (:func:`ctmask.exporter.reduced.export_reduced`)."""
    from ctmask.exporter.reduced import is_ranges_file, sidecar

    files = {}
    if precision == "int8" and not (calibration is not None and is_ranges_file(calibration)):
        files["the ranges file beside --out"] = sidecar(out, "ranges")
    if precision in ("fp16", "int8") and islands is None and fp32_blocks is None:
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
    from ctmask.scale.triton import MAX_BATCH, check_name

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
    from ctmask.scale.triton import triton_model_name

    return triton_model_name(path.stem)


def _check_triton_destination(triton: dict, graph: bool, engine: bool) -> None:
    from ctmask.scale.triton import ENGINE_SUFFIX, check_destination

    check_destination(triton["repo"], [triton["name"]] * graph + [triton["name"] + ENGINE_SUFFIX] * engine)


def _write_triton(triton: dict, graph: Path | None, engine: Path | None, echo) -> dict:
    from ctmask.scale.triton import write_triton_repo

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


def _export_graph(checkpoint: Path, out: Path, precision: str, calibration: Path | None, int8_target: str | None,
                  islands: Path | None, fp32_blocks: str | None, calibration_size: int, measure_size: int,
                  method: str | None, opset: int, quiet: bool):
    """The ONNX graph at ``precision`` (and the reduced-precision summary, or None)."""
    from ctmask.core.errors import ConfigError
    from ctmask.core.progress import console

    if precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"unknown --precision {precision!r}; expected fp32, fp16 or int8")
    if precision != "int8" and int8_target is not None:
        raise ConfigError(f"--int8-target applies to --precision int8, not {precision}")
    if precision == "fp32":
        given = [n for n, v in (("--calibration", calibration), ("--islands", islands),
                                ("--fp32-blocks", fp32_blocks), ("--method", method)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --precision fp16 or int8")
        from ctmask.exporter.onnx_export import export_onnx

        with console.status(f"exporting {checkpoint} (torch.onnx.export, dynamo=True)"):
            return export_onnx(checkpoint, out, opset), None
    from ctmask.exporter.reduced import ReducedOptions, export_reduced

    opts = ReducedOptions(precision, calibration, int8_target or "tensorrt", islands, _blocks(fp32_blocks),
                          calibration_size, measure_size, method or "minmax")
    with console.status(f"exporting {checkpoint} at {precision}") as status:
        return export_reduced(checkpoint, out, opts, opset,
                              on_step=None if quiet else lambda s: status.update(f"{precision}: {s}"))


def _echo_graph(result, summary: dict | None, echo) -> None:
    spec = result.spec
    echo(f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, {result.n_nodes} nodes, opset {spec.opset}, "
         f"{spec.precision}) in {result.seconds:.1f} s")
    echo(f"  preset {spec.preset}: images [B, 1, {spec.image_size}, {spec.image_size}] -> rois [B, "
         f"{spec.n_rois}, 5], logits [B, 3], probs [B, 3], boxes [B, {spec.n_rois}, 4]; checker (full_check) passed"
         + ("; slices body-cropped (crop boxes needed at inference)" if spec.crop else ""))
    if summary is not None:
        echo(format_summary(summary))


def _export_engine(source: Path, out: Path, engine: str, precision: str | None, batch: str, workspace: float,
                   timing_cache: Path | None, images: list[Path] | None, parity_size: int, json_out: Path | None,
                   quiet: bool, graph_opts: dict, triton: dict | None = None) -> None:
    """``export --engine tensorrt``: TensorRT and the GPU are checked before anything is written."""
    from ctmask.core.errors import ConfigError, EngineError
    from ctmask.core.progress import console
    from ctmask.trt.api import require_tensorrt
    from ctmask.trt.build import BuildOptions, build_engine
    from ctmask.trt.cuda import open_cuda
    from ctmask.trt.engine import BatchProfile, is_engine_path

    echo = human_echo(json_out)
    if engine != "tensorrt":
        raise ConfigError(f"unknown --engine {engine!r}; expected tensorrt")
    if not is_engine_path(out):
        raise ConfigError(f"--out {out} must name an engine file (.engine, .plan or .trt)")
    profile = BatchProfile.parse(batch)
    if not 0 < workspace <= 1024:  # also refuses nan
        raise ConfigError(f"--workspace must be a number of GB in (0, 1024], got {workspace}")
    if timing_cache is not None and (timing_cache.is_dir() or not timing_cache.parent.is_dir()):
        raise ConfigError(f"--timing-cache {timing_cache} must name a file in an existing folder")
    if triton is not None:  # the repository takes the graph and the engine: refused now, not after the build
        if triton["kind"] != "gpu":
            raise ConfigError("--triton-kind cpu: a TensorRT engine runs on a GPU only (KIND_GPU)")
        if triton["max_batch"] is not None and triton["max_batch"] > profile.max:
            raise ConfigError(f"--triton-max-batch {triton['max_batch']} is above the engine's --batch MAX "
                              f"{profile.max}: TensorRT refuses larger batches")
        if profile.min > 1:
            raise ConfigError(f"--batch {batch}: an engine for Triton needs MIN 1 (its dynamic batcher sends "
                              "batches from 1 up)")
        triton["name"] = triton["name"] or _default_name(out)
        _check_triton_destination(triton, graph=True, engine=True)
    from_graph = source.suffix.lower() == ".onnx"
    if from_graph:
        given = ["--" + k.replace("_", "-") for k, v in graph_opts.items()
                 if v is not None and k not in ("opset", "calibration_size", "measure_size")]
        given += ["--images"] if images else []
        if given:
            raise ConfigError(f"{source} is an ONNX graph already: {', '.join(given)} apply when exporting from a "
                              "checkpoint")
    elif not images:
        raise ConfigError("building an engine from a checkpoint proves its ONNX graph against PyTorch first: pass "
                          "--images DIR (slices for the parity check), or export the graph, check it with `ctmask "
                          "parity`, and build from the ONNX file")
    from ctmask.trt.engine import sidecar_path

    graph_out = out.with_suffix(".onnx")
    graph_files = {} if from_graph else {
        "the graph beside --out": graph_out,
        **_graph_sidecars(graph_out, precision or "fp32", graph_opts["calibration"], graph_opts["islands"],
                          graph_opts["fp32_blocks"])}
    check_paths({"CKPT_OR_ONNX": source, "--images": images, "--calibration": graph_opts["calibration"],
                 "its slices": split_images(graph_opts["calibration"]), "--islands": graph_opts["islands"]},
                {"--out": out, "the engine's sidecar": sidecar_path(out), **graph_files,
                 "--timing-cache": timing_cache, "--json": json_out}, {"--triton-repo": triton and triton["repo"]})
    if not source.is_file():
        raise ConfigError(f"{source} does not exist")
    require_tensorrt()  # before anything is written: TensorRT and a GPU must be here
    open_cuda().close()
    options = BuildOptions(profile, workspace, timing_cache, precision if from_graph else None)
    summary: dict = {"engine": str(out)}
    graph = source
    if not from_graph:
        from ctmask.backends.parity import check_parity

        graph = graph_out
        result, reduced = _export_graph(source, graph, precision or "fp32", quiet=quiet, **graph_opts)
        _echo_graph(result, reduced, echo)
        with console.status(f"parity of {graph} against PyTorch"):
            report = check_parity(source, graph, list(images or []), parity_size)
        echo(f"parity of {graph}: {'PASSED' if report['passed'] else 'FAILED'} (class agreement "
             f"{report['argmax_agreement']:.2%} on {report['n_images']} slices)")
        summary["onnx"] = str(graph)
        summary["parity"] = {k: report[k] for k in ("passed", "argmax_agreement", "n_images", "failures")}
        if not report["passed"]:
            raise EngineError("the exported graph failed parity against PyTorch; no engine was built: "
                              + ", ".join(report["failures"]), graph,
                              hint=f"ctmask parity {source} {graph} --images ... shows the details")
    with console.status(f"building a TensorRT engine from {graph}") as status:
        info = build_engine(graph, out, options, on_step=None if quiet else lambda s: status.update(f"tensorrt: {s}"))
    spec = info.spec
    echo(f"wrote {out} ({info.plan_bytes / 2**20:.1f} MiB, {spec.precision}, TensorRT {info.tensorrt_version}, "
         f"{info.gpu_name} sm {info.compute_capability}, batch {profile.min}-{profile.max}) in "
         f"{info.build_seconds:.1f} s, and its sidecar {out}.json")
    if triton is not None:
        summary["triton"] = _write_triton(triton, graph, out, echo)
    emit_json(summary | info.to_dict(), json_out)


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
                     f"zero-points {'all 0' if q['activation_zero_points_all_zero'] else 'asymmetric'}; "
                     f"weights {q['weight_types']}")
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


@user_errors
def calibrate(
    model: Path = typer.Argument(..., help="FP32 ctmask ONNX graph."),
    images: Path = typer.Option(..., "--images", help="A folder of slices, a COVIDx-CT split file or a "
                                                      "`ctmask synth` folder (its training split)."),
    out: Path = typer.Option(..., "--out", "-o", help="Ranges file to write (JSON)."),
    size: int = typer.Option(64, "--size", min=1, help="Slices, drawn class-balanced where labels exist."),
    method: str | None = MethodOpt,
    percentile: float = typer.Option(99.999, help="Kept percentile for --method percentile."),
    seed: int = typer.Option(0, help="Seed of the class-balanced draw."),
    ops: str = typer.Option("conv", "--ops", help="Operators INT8 will quantize: conv (Conv, Gemm, MatMul) or "
                                                  "residual (also Add, Relu, MaxPool: faster on onnxruntime's "
                                                  "CPU, more class calls move)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Measure the activation ranges of an FP32 graph on calibration slices (for INT8 export)."""
    from ctmask.calibration.collect import OP_SETS, check_calibratable, collect_ranges
    from ctmask.calibration.ranges import METHODS
    from ctmask.calibration.slices import calibration_set
    from ctmask.core.errors import ConfigError
    from ctmask.core.graphs import load_proto, spec_of
    from ctmask.core.progress import progress

    method = method or "minmax"
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if ops not in OP_SETS:
        raise ConfigError(f"unknown --ops {ops!r}; expected one of {', '.join(OP_SETS)}")
    if not 0 < percentile <= 100:
        raise ConfigError(f"--percentile must be in (0, 100], got {percentile}")
    check_paths({"MODEL": model, "--images": images, "its slices": split_images(images)},
                {"--out": out, "--json": json_out})
    proto = load_proto(model)
    spec = spec_of(proto, model)
    check_calibratable(proto, spec, model)
    cal = calibration_set(images, spec, size, seed)
    for f in cal.skipped:
        typer.secho(f"skipped {f.file}: {f.reason}", fg=typer.colors.YELLOW, err=True)
    with progress(len(cal.images), f"calibrate ({method})", not quiet) as advance:
        ranges = collect_ranges(model, spec, cal, method, batch_size, percentile, on_batch=advance,
                                op_types=OP_SETS[ops], proto=proto)
    try:
        ranges.save(out)
    except OSError as exc:
        from ctmask.core.errors import DataError

        raise DataError(f"cannot write the ranges file ({exc.__class__.__name__}: {exc.strerror or exc})", out) \
            from None
    counts = ", ".join(f"class {k}: {v}" for k, v in sorted(cal.class_counts().items()))
    human_echo(json_out)(f"wrote {out}: {len(ranges.ranges)} tensor ranges ({method}) from {len(cal.slices)} slices "
                         f"({counts}) in {ranges.options['seconds']:.1f} s; graph sha256 "
                         f"{ranges.graph_sha256[:12]}...")
    emit_json({"ranges": str(out), "method": method, "tensors": len(ranges.ranges), "slices": len(cal.slices),
               "classes": cal.class_counts(), "graph_sha256": ranges.graph_sha256,
               "skipped": [f.to_dict() for f in cal.skipped], "seconds": ranges.options["seconds"]}, json_out)


@user_errors
def precision_report(
    checkpoint: Path = typer.Argument(..., help="Classifier checkpoint."),
    images: Path = typer.Option(..., "--images", help="Measurement slices: a folder, a split file or a synth "
                                                      "folder; for INT8 also a ranges file (its slices are used)."),
    precision: str = typer.Option("fp16", "--precision", help="fp16 | int8."),
    int8_target: str | None = TargetOpt,
    size: int = SizeOpt,
    measure_size: int = MeasureOpt,
    method: str | None = MethodOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Report to write (JSON; reusable by export "
                                                              "--islands)."),
    nodes: bool = typer.Option(False, "--nodes", help="Also reduce every Conv / Gemm / MatMul of the candidate "
                                                      "blocks alone (one graph per node: slower)."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Per-block sensitivity: each block alone in FP16 / INT8, its effect on class calls and logits,
    against the FP32 graph's own noise floor (its calls under input noise of a quarter gray level)."""
    from ctmask.core.progress import console
    from ctmask.exporter.reduced import ReducedOptions, measure_precision

    # refused before minutes of measurement, not after
    check_paths({"CHECKPOINT": checkpoint, "--images": images, "its slices": split_images(images)},
                {"--out": out, "--json": json_out})
    opts = ReducedOptions(precision, images, int8_target or "tensorrt", None, None, size, measure_size,
                          method or "minmax")
    with console.status(f"measuring {checkpoint} at {precision}") as status:
        report = measure_precision(checkpoint, opts, out,
                                   on_step=None if quiet else lambda s: status.update(f"{precision}: {s}"),
                                   nodes=nodes)
    human_echo(json_out)(format_report(report, out))
    emit_json(report, json_out)


def format_report(report: dict, out: Path | None) -> str:
    c = report["choice"]
    lines = [f"{c['precision']} sensitivity on {c['n_slices']} slices, against the FP32 graph",
             f"{'block(s) reduced':<58}{'calls changed':>14}{'max |dlogit|':>14}{'max |dscore|':>14}"]
    for e in c["alone"] + c["combined_steps"]:
        lines.append(f"{'+'.join(e['blocks']):<58}{e['changed_calls']:>9} / {e['n']:<3}{e['max_abs_logits']:>14.3g}"
                     f"{e['max_abs_score']:>14.3g}")
    noise = c.get("noise_floor")
    if noise is not None:
        lines.append(f"{'FP32 itself, input noise +-' + format(noise['gray_levels'], 'g') + ' gray level':<58}"
                     f"{noise['changed_calls']:>9} / {noise['n']:<3}{noise['max_abs_logits']:>14.3g}"
                     f"{noise['max_abs_score']:>14.3g}")
    if c.get("nodes") is not None:
        lines.append(f"each node alone ({len(c['nodes'])}), most calls changed first:")
        for e in sorted(c["nodes"], key=lambda e: (-e["changed_calls"], -e["max_abs_logits"])):
            label = f"  {e['node']} ({e['op_type']}, {e['block']})"
            lines.append(f"{label:<58}{e['changed_calls']:>9} / {e['n']:<3}{e['max_abs_logits']:>14.3g}"
                         f"{e['max_abs_score']:>14.3g}")
    lines.append(f"reduced: {', '.join(c['reduced']) or 'nothing'}")
    for block, why in sorted(c["fp32_islands"].items()):
        lines.append(f"FP32 island {block}: {why}")
    if out is not None:
        lines.append(f"wrote {out}")
    return "\n".join(lines)


COMMANDS = {"export": export, "calibrate": calibrate, "precision-report": precision_report}
