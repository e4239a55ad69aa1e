"""Deployment commands: export, infer, parity, bench.

``infer`` on an ONNX model never imports torch (a test enforces it): torch-backed
pieces are imported only when a checkpoint is run.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import typer

from ctmask.cli.common import JsonOpt, QuietOpt, emit_json, human_echo, user_errors
from ctmask.core.errors import ConfigError

CHECKPOINT_SUFFIXES = (".pt", ".pth")


@user_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Classifier checkpoint (from train-cls)."),
    out: Path = typer.Option(..., "--out", "-o", help="ONNX file to write."),
    opset: int = typer.Option(18, help="ONNX opset: 18 up to the newest the installed onnx package knows; an "
                                       "opset the exporter cannot produce is refused."),
    json_out: Path | None = JsonOpt,
) -> None:
    """Export detector + S to one ONNX graph: images [B,1,S,S] -> rois [B,N,5], logits, probs."""
    from ctmask.core.progress import console
    from ctmask.exporter.onnx_export import export_onnx

    echo = human_echo(json_out)
    with console.status(f"exporting {checkpoint} (torch.onnx.export, dynamo=True)"):
        result = export_onnx(checkpoint, out, opset)
    spec = result.spec
    echo(f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, {result.n_nodes} nodes, opset {spec.opset}) "
               f"in {result.seconds:.1f} s")
    echo(f"  preset {spec.preset}: images [B, 1, {spec.image_size}, {spec.image_size}] -> rois [B, "
         f"{spec.n_rois}, 5], logits [B, 3], probs [B, 3]; checker (full_check) passed"
         + ("; slices body-cropped (crop boxes needed at inference)" if spec.crop else ""))
    emit_json(result.to_dict(), json_out)


def make_runner(model: Path, backend: str, device: str, threads: int | None):
    """The runner for ``model``: a checkpoint runs in torch, anything else in onnxruntime."""
    if backend == "auto":
        backend = "torch" if model.suffix.lower() in CHECKPOINT_SUFFIXES else "onnxruntime"
    if backend == "onnxruntime":
        from ctmask.runtime.runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model, device=device, threads=threads)
    if backend == "torch":
        from ctmask.exporter.reference import TorchRunner

        return TorchRunner(model, device=device, threads=threads)
    raise ConfigError(f"unknown backend {backend!r}; expected auto, onnxruntime or torch")


@user_errors
def infer(
    model: Path = typer.Argument(..., help="ctmask ONNX model (or a classifier checkpoint for the PyTorch path)."),
    inputs: list[Path] = typer.Argument(..., help="Slices (PNG, JPEG, TIFF, DICOM) or folders of them."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Predictions file: .jsonl or .csv (default: stdout)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Slices per inference call."),
    backend: str = typer.Option("auto", help="auto | onnxruntime | torch (auto: by the model file)."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    threads: int | None = typer.Option(None, help="CPU threads (default: the backend's own choice)."),
    top_rois: int = typer.Option(5, help="RoI rows kept per slice in the output."),
    boxes: Path | None = typer.Option(None, "--boxes", help="COVIDx-CT split file with each slice's body crop box "
                                                            "(needed by a model trained with --crop; matched by "
                                                            "path, else by file name)."),
    uncropped: bool = typer.Option(False, "--uncropped", help="Run a model trained on cropped slices on whole "
                                                              "slices anyway (off its training distribution)."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Predict normal / pneumonia / COVID-19 for every slice, in batches.

    Pre-processing (input size, DICOM window, body crop) follows the model's metadata. Unreadable slices are
    reported (path and reason) and skipped; the rest are processed and the exit status is 1. The output file
    appears only when the run completes. Without --out the predictions are printed (and, with --json, included
    in the JSON).
    """
    from ctmask.core.progress import progress
    from ctmask.runtime.predict import CropBoxes, Failure, PredictionWriter, check_crop, collect_images, predict_files

    t0 = time.perf_counter()
    echo = human_echo(json_out)
    files, failures = collect_images(inputs)
    crop_boxes = CropBoxes.from_split(boxes) if boxes is not None else None
    runner = make_runner(model, backend, device, threads)
    counts: dict[str, int] = {}
    records: list[dict] = []
    with runner:
        spec = runner.spec
        check_crop(spec, crop_boxes, uncropped)
        if spec.crop and uncropped:
            typer.secho(f"warning: {model} was trained on body-cropped slices; running it on whole slices "
                        "(--uncropped) puts it off its training distribution", fg=typer.colors.YELLOW, err=True)
        elif not spec.crop and crop_boxes is not None:
            typer.secho(f"warning: {model} was trained on whole slices; --boxes ignored", fg=typer.colors.YELLOW,
                        err=True)
        writer = PredictionWriter(out, spec.class_names) if out is not None else None
        with (writer or contextlib.nullcontext()), progress(len(files), "infer", not quiet) as advance:
            for item in predict_files(runner, files, batch_size, top_rois, on_batch=advance, boxes=crop_boxes,
                                      uncropped=uncropped):
                if isinstance(item, Failure):
                    failures.append(item)
                    continue
                counts[item.class_name] = counts.get(item.class_name, 0) + 1
                if writer is not None:
                    writer.write(item)
                else:
                    records.append(item.to_dict())
                    probs = " ".join(f"{k}={v:.4f}" for k, v in item.probs.items())
                    echo(f"{item.file}\t{item.class_name}\t{probs}")
        described = runner.describe()
    seconds = time.perf_counter() - t0
    for f in failures:
        typer.secho(f"skipped {f.file}: {f.reason}", fg=typer.colors.YELLOW, err=True)
    n_ok = sum(counts.values())
    typer.echo(f"predicted {n_ok} slices ({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'}), "
               f"skipped {len(failures)}, in {seconds:.2f} s on {described.get('provider', described['backend'])}"
               + (f"; wrote {out}" if out is not None else ""), err=True)
    summary = {"model": str(model), "runner": described, "predicted": n_ok, "classes": counts,
               "skipped": [f.to_dict() for f in failures], "seconds": round(seconds, 3),
               "out": None if out is None else str(out), "crop": bool(spec.crop and not uncropped)}
    if out is None:
        summary["predictions"] = records
    emit_json(summary, json_out)
    if failures:
        raise typer.Exit(1)


@user_errors
def parity(
    checkpoint: Path = typer.Argument(..., help="Classifier checkpoint (the PyTorch reference)."),
    model: Path = typer.Argument(..., help="ONNX model exported from it."),
    images: list[Path] = typer.Option(..., "--images", help="Slices or folders (repeatable)."),
    max_images: int = typer.Option(64, min=1, help="Compare on the first N slices."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    min_argmax_agreement: float = typer.Option(1.0, help="Required fraction of identical class calls."),
    polygraphy: Path | None = typer.Option(None, help="Also save inputs + PyTorch outputs here for Polygraphy."),
    jitter: float = typer.Option(1e-6, min=0.0, help="Input noise of the stability probe for failing slices "
                                                     "(0: off)."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run PyTorch and the exported graph on the same tensors; judge every output.

    Tolerances come from ctmask's own table for the precision the graph declares. RoI rows are matched one to
    one against PyTorch's ranking of N + 64 candidates; near-tied rows may trade places only within the order
    tolerance. Exit status 1 when any line fails or a class call differs end to end. A failing slice on which
    PyTorch itself moves by at least half the graph's error under +-jitter input noise (a top-k / NMS decision
    on a knife edge) is reported with both figures and judged out, up to 5% of the slices.
    """
    from ctmask.core.progress import progress
    from ctmask.exporter.parity import check_parity

    with contextlib.ExitStack() as stack:
        advance = [lambda n=1: None]

        def on_start(n: int) -> None:
            advance[0] = stack.enter_context(progress(n, "parity", not quiet))

        report = check_parity(checkpoint, model, images, max_images, batch_size, min_argmax_agreement, polygraphy,
                              on_batch=lambda n: advance[0](n), on_start=on_start, jitter=jitter)
    for w in report["warnings"]:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    for s in report["skipped"]:
        typer.secho(f"skipped {s['file']}: {s['error']}", fg=typer.colors.YELLOW, err=True)
    human_echo(json_out)(format_parity(report))
    emit_json(report, json_out)
    if polygraphy is not None:
        t = report["tolerances"]
        typer.echo(f"polygraphy run {model} --onnxrt --load-inputs {polygraphy / 'inputs.json'} "
                   f"--load-outputs {polygraphy / 'reference_outputs.json'} --atol logits:{t['logits']['atol']:g} "
                   f"probs:{t['probs']['atol']:g} rois:{t['rois.deltas']['atol']:g} --rtol "
                   f"rois:{t['rois.deltas']['rtol']:g} --check-error-stat rois:median logits:max probs:max", err=True)
    if not report["passed"]:
        raise typer.Exit(1)


def format_parity(report: dict) -> str:
    """Plain-text table of a parity report."""
    lines = [f"parity: {report['runners']['candidate']['backend']} ({report['precision']}) vs "
             f"{report['runners']['reference']['backend']} on {report['n_images']} slices ({report['preset']} preset; "
             f"reference ranks N + {report['reference_candidates']} candidates; tolerances: ctmask's "
             f"{report['precision']} table)",
             f"{'line':<13}{'max abs':>11}{'mean abs':>11}{'max rel':>11}{'needed atol':>13}{'atol':>9}"
             f"{'rtol':>8}  result"]
    for name, r in report["outputs"].items():
        lines.append(f"{name:<13}{r['max_abs']:>11.3g}{r['mean_abs']:>11.3g}{r['max_rel']:>11.3g}"
                     f"{r['required_atol']:>13.3g}{r['atol']:>9.0e}{r['rtol']:>8.0e}  "
                     + ("pass" if r["passed"] else f"FAIL ({r['n_failing']} elements)"))
    c = report["rois"]
    bad = c["unmatched"] + c["missing"] + c["intruders"] + c["bad_padding"]
    lines.append(f"rois.rows: {c['rows']} real rows; unmatched {c['unmatched']}, missing {c['missing']}, "
                 f"intruders {c['intruders']}, bad padding {c['bad_padding']}  " + ("pass" if not bad else "FAIL"))
    lines.append(f"near-ties: {c['reordered']} row(s) reordered, {c['cut_swaps']} swapped at the N cut, in "
                 f"{len(c['permuted_slices'])} slice(s) (logits there judged against torch S on the reference's "
                 "rows in the graph's order)")
    for name, m in report.get("metadata_mismatches", {}).items():
        lines.append(f"metadata: the graph's {name} {m['graph']!r} differs from the checkpoint's {m['checkpoint']!r}  "
                     "FAIL")
    lines.append(f"class agreement (end to end) {report['argmax_agreement']:.2%} "
                 f"(required {report['min_argmax_agreement']:.0%})")
    for item in report["probed_slices"]:
        own = ", ".join(f"{k} {item['graph_max_abs'][k]:.3g} vs {v:.3g}"
                        for k, v in item["reference_jitter_max_abs"].items())
        verdict = "unstable slice (judged out)" if item["judged_out"] else "probed, not judged out"
        lines.append(f"  {verdict} {item['file']}: graph error vs PyTorch's own movement under input jitter: {own}")
    if report.get("probe_skipped"):
        lines.append(f"stability probe skipped: {len(report['failing_slices'])} of {report['n_images']} slices fail, "
                     "more than may ever be judged out")
    for item in report.get("failing_slices", [])[:10]:
        errs = ", ".join(f"{k} {v:.3g}" for k, v in item["max_abs"].items())
        lines.append(f"  failing slice {item['file']}: {errs}")
    lines.append("PASSED" if report["passed"] else "FAILED: " + ", ".join(report["failures"]))
    return "\n".join(lines)


@user_errors
def bench(
    model: Path = typer.Argument(..., help="ctmask ONNX model."),
    backend: list[str] | None = typer.Option(None, "--backend",
                                             help="torch-cpu, torch-cuda, onnxruntime-cpu, onnxruntime-cuda "
                                                  "(repeatable; default: every available one)."),
    batch_size: list[int] = typer.Option([1, 8], "--batch-size", "-b", help="Batch sizes (repeatable)."),
    checkpoint: Path | None = typer.Option(None, help="Checkpoint for the PyTorch reference (default: the one "
                                                      "named in the model's metadata, if present and unchanged)."),
    images: Path | None = typer.Option(None, help="Folder of slices to run (default: synthetic slices)."),
    warmup: int = typer.Option(2, min=0),
    iterations: int = typer.Option(10, min=1),
    threads: int | None = typer.Option(None, help="CPU threads for every backend (default: each one's own "
                                                  "choice)."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Latency p50/p90/p99, throughput and peak memory of every backend on the same inputs."""
    from ctmask.runtime.bench import onnxruntime_resolver, plan_backends, run_plan

    def torch_backend(device, spec):
        # Imported only when a torch backend is planned: an onnxruntime-only bench stays torch-free.
        try:
            from ctmask.exporter.reference import torch_resolver
        except ImportError:
            return None, "torch is not installed"
        return torch_resolver(checkpoint, threads)(device, spec)

    resolvers = {"onnxruntime": onnxruntime_resolver(model, threads), "torch": torch_backend}
    plan = plan_backends(model, backend, resolvers)
    for name, why in plan.skipped.items():
        typer.secho(f"not benchmarked: {name}: {why}", fg=typer.colors.YELLOW, err=True)
    report = run_plan(plan, batch_size, images, warmup, iterations, not quiet)
    human_echo(json_out)(format_bench(report))
    emit_json(report, json_out)


def format_bench(report: dict) -> str:
    lines = [f"{'backend':<18}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'slices/s':>10}"
             f"{'+RSS MB':>9}{'peak MB':>9}{'vs torch':>10}"]
    ref = report.get("reference")
    for r in report["results"]:
        ratio = report["speedup"].get(r["backend"], {}).get(r["batch_size"]) if ref else None
        ratio_s = "1.00x" if r["backend"] == ref else (f"{ratio:.2f}x" if ratio else "-")
        added = f"{r['added_rss_mb']:.0f}" if r.get("added_rss_mb") is not None else "-"
        peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
        lat = r["latency_ms"]
        lines.append(f"{r['backend']:<18}{r['batch_size']:>6}{lat['p50']:>10.1f}{lat['p90']:>10.1f}{lat['p99']:>10.1f}"
                     f"{r['throughput']:>10.2f}{added:>9}{peak:>9}{ratio_s:>10}")
    return "\n".join(lines)


COMMANDS = {"export": export, "infer": infer, "parity": parity, "bench": bench}
