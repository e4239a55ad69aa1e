"""Calibration and the per-block sensitivity report (``export``: :mod:`ctmask.cli.export`).

``calibrate`` measures the activation ranges of an FP32 graph into a ranges file;
``precision-report`` measures what running each block in reduced precision does to the class
calls.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ctmask.cli.common import JsonOpt, QuietOpt, check_paths, emit_json, human_echo, split_images, user_errors

SizeOpt = typer.Option(64, "--calibration-size", min=1, help="Calibration slices, drawn class-balanced where "
                                                             "labels exist.")
MeasureOpt = typer.Option(200, "--measure-size", min=1, help="Slices the FP32 islands are measured on (drawn "
                                                             "like the calibration slices): 200 lets 0.5% be one "
                                                             "changed call. With a ranges file, its own slices.")
MethodOpt = typer.Option(None, "--method", help="Calibration method: minmax (default) | entropy | percentile.")
ResidualOpt = typer.Option(None, "--residual", help="INT8: what a ResNet block's identity path and the FPN's "
                                                    "top-down path read: float or int8 (the tensor as the next "
                                                    "convolution reads it; faster on TensorRT and OpenVINO). "
                                                    "Default: the form a QAT detector was fine-tuned with (its "
                                                    "ranges file), else float.")
TargetOpt = typer.Option(None, "--int8-target", help="Q/DQ flavour: tensorrt (int8 symmetric activations, "
                                                           "zero-point 0) or cpu (uint8 activations: onnxruntime's "
                                                           "fast x86 form). Default: tensorrt.")


@user_errors
def calibrate(
    model: Path = typer.Argument(..., help="FP32 ctmask ONNX graph."),
    images: Path = typer.Option(..., "--images", help="A folder of slices, a COVIDx-CT split file or a "
                                                      "`ctmask synth` folder (its training split)."),
    out: Path = typer.Option(..., "--out", "-o", help="Ranges file to write (JSON)."),
    size: int = typer.Option(64, "--size", min=1, help="Slices, drawn class-balanced where labels exist."),
    method: str | None = MethodOpt,
    percentile: float = typer.Option(99.999, help="Kept percentile for --method percentile."),
    bins: int = typer.Option(2048, "--bins", min=256, max=16384,
                             help="Histogram bins of --method entropy / percentile (onnxruntime's default 2048; "
                                  "entropy's KL search over them takes most of its time, growing about as bins^1.8: "
                                  "32768 took 43 s per tensor; it needs more than the 128 bins of the int8 grid)."),
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
        ranges = collect_ranges(model, spec, cal, method, batch_size, percentile, num_bins=bins, on_batch=advance,
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
    residual: str | None = ResidualOpt,
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
                          method or "minmax", residual=residual)
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


COMMANDS = {"calibrate": calibrate, "precision-report": precision_report}
