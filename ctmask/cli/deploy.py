"""Deployment commands: export, infer, parity, bench.

``infer`` on an ONNX model never imports torch (a test enforces it): torch-backed
pieces are imported only when a checkpoint is run.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import typer

from ctmask.cli.common import JsonOpt, QuietOpt, emit_json, user_errors
from ctmask.core.errors import ConfigError

CHECKPOINT_SUFFIXES = (".pt", ".pth")


@user_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Classifier checkpoint (from train-cls)."),
    out: Path = typer.Option(..., "--out", "-o", help="ONNX file to write."),
    opset: int = typer.Option(18, help="ONNX opset (>= 18)."),
    json_out: Path | None = JsonOpt,
) -> None:
    """Export detector + S to one ONNX graph: images [B,1,S,S] -> rois [B,N,5], logits, probs."""
    from ctmask.core.progress import console
    from ctmask.exporter.onnx_export import export_onnx

    with console.status(f"exporting {checkpoint} (torch.onnx.export, dynamo=True)"):
        result = export_onnx(checkpoint, out, opset)
    spec = result.spec
    typer.echo(f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, {result.n_nodes} nodes, opset {spec.opset}) "
               f"in {result.seconds:.1f} s")
    typer.echo(f"  preset {spec.preset}: images [B, 1, {spec.image_size}, {spec.image_size}] -> rois [B, "
               f"{spec.n_rois}, 5], logits [B, 3], probs [B, 3]; checker (full_check) passed")
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
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Predict normal / pneumonia / COVID-19 for every slice, in batches.

    Unreadable slices are reported (path and reason) and skipped; the rest are processed and the exit status
    is 1. The output file appears only when the run completes.
    """
    from ctmask.core.progress import progress
    from ctmask.runtime.predict import Failure, PredictionWriter, collect_images, predict_files

    t0 = time.perf_counter()
    files, failures = collect_images(inputs)
    runner = make_runner(model, backend, device, threads)
    counts: dict[str, int] = {}
    with runner:
        spec = runner.spec
        writer = PredictionWriter(out, spec.class_names) if out is not None else None
        with (writer or contextlib.nullcontext()), progress(len(files), "infer", not quiet) as advance:
            for item in predict_files(runner, files, batch_size, top_rois, on_batch=advance):
                if isinstance(item, Failure):
                    failures.append(item)
                    continue
                counts[item.class_name] = counts.get(item.class_name, 0) + 1
                if writer is not None:
                    writer.write(item)
                else:
                    probs = " ".join(f"{k}={v:.4f}" for k, v in item.probs.items())
                    typer.echo(f"{item.file}\t{item.class_name}\t{probs}")
        described = runner.describe()
    seconds = time.perf_counter() - t0
    for f in failures:
        typer.secho(f"skipped {f.file}: {f.reason}", fg=typer.colors.YELLOW, err=True)
    n_ok = sum(counts.values())
    typer.echo(f"predicted {n_ok} slices ({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'}), "
               f"skipped {len(failures)}, in {seconds:.2f} s on {described.get('provider', described['backend'])}"
               + (f"; wrote {out}" if out is not None else ""), err=True)
    emit_json({"model": str(model), "runner": described, "predicted": n_ok, "classes": counts,
               "skipped": [f.to_dict() for f in failures], "seconds": round(seconds, 3),
               "out": None if out is None else str(out)}, json_out)
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

    Exit status 1 when any output is out of tolerance or class calls disagree. A failing slice on which PyTorch
    itself moves beyond the tolerances under +-jitter input noise (a top-k / NMS decision on a knife edge) is
    reported as unstable and judged out, up to 5% of the slices.
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
    typer.echo(format_parity(report))
    emit_json(report, json_out)
    if polygraphy is not None:
        typer.echo(f"polygraphy run {model} --onnxrt --load-inputs {polygraphy / 'inputs.json'} "
                   f"--load-outputs {polygraphy / 'reference_outputs.json'} --atol logits:1e-3 probs:1e-4 rois:1e-3 "
                   f"--rtol rois:1e-3 --check-error-stat rois:median logits:max probs:max", err=True)
    if not report["passed"]:
        raise typer.Exit(1)


def format_parity(report: dict) -> str:
    """Plain-text table of a parity report."""
    lines = [f"parity: {report['runners']['candidate']['backend']} vs {report['runners']['reference']['backend']} "
             f"on {report['n_images']} slices ({report['preset']} preset)",
             f"{'output':<13}{'max abs':>11}{'mean abs':>11}{'max rel':>11}{'needed atol':>13}{'atol':>9}"
             f"{'rtol':>8}  result"]
    for name, r in report["outputs"].items():
        lines.append(f"{name:<13}{r['max_abs']:>11.3g}{r['mean_abs']:>11.3g}{r['max_rel']:>11.3g}"
                     f"{r['required_atol']:>13.3g}{r['atol']:>9.0e}{r['rtol']:>8.0e}  "
                     + ("pass" if r["passed"] else f"FAIL ({r['n_failing']} elements)"))
    c = report["rois"]
    lines.append(f"rois rows: {c['rows']}, reordered near-ties {c['reordered_rows']}, cut-off ties "
                 f"{c['boundary_rows']}, unmatched {c['unmatched_rows']}")
    if c["tie_affected_images"]:
        lines.append(f"{len(c['tie_affected_images'])} slice(s) with near-tied RoIs: logits judged against torch S "
                     "on the graph's own RoIs")
    lines.append(f"argmax agreement {report['argmax_agreement']:.2%} (required {report['min_argmax_agreement']:.0%})")
    for item in report["unstable_slices"]:
        errs = ", ".join(f"{k} {v:.3g}" for k, v in item["graph_max_abs"].items())
        own = ", ".join(f"{k} {v:.3g}" for k, v in item["reference_jitter_max_abs"].items())
        lines.append(f"  unstable slice {item['file']} (judged out): graph off by {errs}; PyTorch vs itself under "
                     f"input jitter: {own}")
    for item in report.get("failing_slices", [])[:10]:
        errs = ", ".join(f"{k} {v:.3g}" for k, v in item["max_abs"].items())
        lines.append(f"  failing slice {item['file']}: {errs or 'class call differs'}"
                     + (f", {item['unmatched_rows']} unmatched RoI row(s)" if item["unmatched_rows"] else ""))
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
    typer.echo(format_bench(report))
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
