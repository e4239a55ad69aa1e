"""``check-triton``: a Triton Inference Server model repository checked against Triton's own
config schema and the models it holds (:mod:`ctmask.scale.triton`)."""

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
    from ctmask.scale.triton import check_triton_repo, model_folders

    check_paths({"REPO": repo}, {"--json": json_out}, slice_folders=False)  # every file of a repository is read
    findings = check_triton_repo(repo)
    models = [p.name for p in model_folders(repo)]
    echo = human_echo(json_out)
    echo(f"check-triton {repo}: {len(models)} model(s){': ' + ', '.join(models) if models else ''}")
    for finding in findings:
        echo(f"  {finding}")
    echo(f"{len(findings)} finding(s)" if findings else "no findings")
    emit_json({"repo": str(repo), "models": models, "passed": not findings,
               "findings": [f.to_dict() for f in findings]}, json_out)
    if findings:
        raise typer.Exit(1)


COMMANDS = {"check-triton": check_triton}
