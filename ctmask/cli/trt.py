"""``check-trt``: what TensorRT's ONNX parser and builder will demand of a graph, checked
without a GPU (:mod:`ctmask.trt.check`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ctmask.cli.common import JsonOpt, check_paths, emit_json, human_echo, user_errors


@user_errors
def check_trt(
    model: Path = typer.Argument(..., help="ONNX graph (a ctmask graph or any ONNX model)."),
    trt_version: int = typer.Option(10, "--trt-version", help="TensorRT major version: 10 or 11."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, max=4096, help="Largest batch of the engine's optimisation "
                                                                 "profile: shapes that grow with the batch (TopK's "
                                                                 "K, NMS boxes, tensor sizes) are judged at it."),
    json_out: Path | None = JsonOpt,
) -> None:
    """Check, without a GPU or TensorRT, what TensorRT's ONNX parser and builder will demand of a graph.

    One line per finding, `SEVERITY node (OpType): message`: operators and their types against TensorRT's
    operator matrix, the opset, dynamic dimensions (only the batch), TopK's K (at most 3840), NMS boxes per call
    (TopK box limit 5000), the RoiAlign plugin, INT64 narrowing, Q/DQ (INT8, zero-point 0) and strongly typed
    input types. Exit status 1 when a finding is fatal (TensorRT would refuse the graph or compute something
    else), 0 otherwise, 2 for a missing or unreadable file.
    """
    from ctmask.core.errors import ConfigError
    from ctmask.trt.check import SEVERITIES, check_graph, fatal, format_findings

    if trt_version not in (10, 11):
        raise ConfigError(f"--trt-version must be 10 or 11, got {trt_version}")
    check_paths({"MODEL": model}, {"--json": json_out})
    findings = check_graph(model, trt_version, max_batch)
    echo = human_echo(json_out)
    echo(f"check-trt {model}: TensorRT {trt_version}.x, batch up to {max_batch}")
    echo(format_findings(findings))
    bad = fatal(findings)
    emit_json({"model": str(model), "trt_version": trt_version, "max_batch": max_batch, "passed": not bad,
               "counts": {s: sum(f.severity == s for f in findings) for s in SEVERITIES},
               "findings": [f.to_dict() for f in findings]}, json_out)
    if bad:
        raise typer.Exit(1)


COMMANDS = {"check-trt": check_trt}
