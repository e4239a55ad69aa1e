"""``ctmask qat`` (quantization-aware fine-tuning of the detector) and ``ctmask qat-ranges``
(the ranges file of a graph exported from a QAT detector)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ctmask.cli.common import JsonOpt, QuietOpt, check_paths, emit_json, human_echo, user_errors


@user_errors
def qat(
    checkpoint: Path = typer.Argument(..., help="Segmentation checkpoint to fine-tune (FP32 detector)."),
    train_dir: Path = typer.Argument(..., help="CNCB-layout folder with images/ and masks/ (train-seg's data)."),
    graph: Path = typer.Option(..., "--graph", help="FP32 graph exported from a classifier on this detector."),
    ranges: Path = typer.Option(..., "--ranges", help="Its ranges file (`ctmask calibrate`): initial activation "
                                                      "scales."),
    out: Path = typer.Option(..., "--out", "-o", help="Segmentation checkpoint to write (FP32 weights, the "
                                                      "activation scales in its config)."),
    steps: int = typer.Option(300, help="Optimiser steps."),
    batch_size: int = typer.Option(4, "--batch-size", "-b"),
    lr: float = typer.Option(2e-5, help="Adam learning rate."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    distill: float = typer.Option(1.0, help="Weight of the distillation term (fake-quantized heads' "
                                            "outputs against the detector before the fine-tune, FP32); "
                                            "0: detection losses only."),
    seed: int = typer.Option(0),
    residual: str = typer.Option("float", "--residual", help="What a ResNet block's identity path and the FPN's "
                                 "top-down path read: float (the FP32 model's tensor) or int8 (the tensor as the "
                                 "next convolution reads it: the placement TensorRT and OpenVINO fuse, faster)."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Quantization-aware fine-tuning of the detector with NVIDIA ModelOpt fake-quantization
    matching `export --precision int8` (per-channel int8 weights, per-tensor activations from
    the ranges file); the saved checkpoint is a plain FP32 segmentation checkpoint."""
    from ctmask.data.cncb import list_segmentation
    from ctmask.training.qat import QatOptions, train_qat

    check_paths({"CHECKPOINT": checkpoint, "TRAIN_DIR": train_dir, "--graph": graph, "--ranges": ranges},
                {"--out": out, "--out's sidecar": out.with_name(out.name + ".json"), "--json": json_out})
    opts = QatOptions(steps, batch_size, lr, weight_decay, distill, True, seed, residual)
    summary = train_qat(checkpoint, list_segmentation(train_dir), graph, ranges, out, opts, not quiet)
    human_echo(json_out)(f"QAT: {summary['steps']} steps, {summary['quantizers']} quantizers "
                         f"({summary['weight_quantizers']} weight), {summary['seconds']:.0f} s; wrote {out}")
    emit_json(summary, json_out)


@user_errors
def qat_ranges(
    graph: Path = typer.Argument(..., help="FP32 graph exported from a classifier on a QAT detector."),
    checkpoint: Path = typer.Option(..., "--qat", help="The QAT segmentation checkpoint (`ctmask qat --out`)."),
    base: Path = typer.Option(..., "--base", help="A ranges file of GRAPH (`ctmask calibrate`): tensors outside "
                                                  "the detector keep these."),
    out: Path = typer.Option(..., "--out", "-o", help="Ranges file to write."),
    quiet: bool = QuietOpt,
) -> None:
    """The ranges file of GRAPH with the activation scales the QAT fine-tune trained with."""
    from ctmask.calibration.ranges import RESIDUAL_FORMS, load_ranges
    from ctmask.core.errors import CheckpointError
    from ctmask.core.graphs import load_proto
    from ctmask.training.checkpoint import load_checkpoint
    from ctmask.training.qat import graph_quantizers
    from ctmask.training.qat import qat_ranges as make

    check_paths({"GRAPH": graph, "--qat": checkpoint, "--base": base}, {"--out": out})
    ck = load_checkpoint(checkpoint, kind="segmentation")
    amax = ck.config.get("qat", {}).get("amax")
    if not amax:
        raise CheckpointError("not a QAT checkpoint (no config.qat.amax)", checkpoint)
    proto = load_proto(graph)
    qat = ck.config["qat"]
    options = qat.get("options") if isinstance(qat.get("options"), dict) else {}
    residual = qat.get("residual", options.get("residual", "float"))
    if residual not in RESIDUAL_FORMS:
        raise CheckpointError(f"the QAT checkpoint names an unknown residual form {json.dumps(residual)} "
                              f"(config.qat.residual; expected {' or '.join(RESIDUAL_FORMS)})", checkpoint)
    rf = make(proto, amax, load_ranges(base), base, str(graph), residual=residual)
    rf.save(out)
    if not quiet:
        typer.echo(f"wrote {out}: {len(graph_quantizers(proto))} detector tensors from the QAT scales "
                   f"(residual paths {residual}), {len(rf.ranges)} ranges in all")


COMMANDS = {"qat": qat, "qat-ranges": qat_ranges}
