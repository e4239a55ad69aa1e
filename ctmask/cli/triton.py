"""``check-triton``: a Triton Inference Server model repository checked against Triton's own
config schema and the models it holds (:mod:`ctmask.scale.triton_check`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ctmask.cli.common import JsonOpt, check_paths, emit_json, human_echo, user_errors


@user_errors
def check_triton(
    repo: Path = typer.Argument(..., help="Triton model repository (as `ctmask export ... --triton-repo` writes)."),
    json_out: Path | None = JsonOpt,
) -> None:
    """Check a Triton model repository without a Triton server (pip install 'ctmask[triton]').

    Every `config.pbtxt` is parsed into Triton's `ModelConfig` message (a syntax or schema error names the file
    and line); each version folder must hold the file its platform loads (`model.onnx`, `model.plan`) with the
    sha256 the config records; for ONNX models the config's input / output names, data types and dims must match
    the graph's own declared inputs / outputs and its ctmask spec; `max_batch_size` >= 1, preferred batch sizes at
    most that (and, for a TensorRT plan, at most its batch profile's MAX); `labels.txt` holds the class names.
    One line per finding; exit status 1 when there is one, 0 otherwise, 2 for a missing or unusable folder.
    """
    from ctmask.scale.triton_check import check_report

    check_paths({"REPO": repo}, {"--json": json_out}, slice_folders=False)  # every file of a repository is read
    report, lines = check_report(repo)
    echo = human_echo(json_out)
    for line in lines:
        echo(line)
    emit_json(report, json_out)
    if not report["passed"]:
        raise typer.Exit(1)


COMMANDS = {"check-triton": check_triton}
