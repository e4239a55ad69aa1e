"""``serve`` and ``bench-serve``: a model behind HTTP on Ray Serve (:mod:`ctmask.scale.serve`) and
its load test (:mod:`ctmask.scale.loadtest`). Ray is imported only inside the commands."""

from __future__ import annotations

from pathlib import Path

import typer

from ctmask.cli.common import (
    BACKEND,
    DEVICE,
    FORCE_MODALITY,
    HU_OFFSET,
    THREADS,
    TOP_ROIS,
    UNCROPPED,
    JsonOpt,
    check_paths,
    emit_json,
    human_echo,
    user_errors,
)

BackendOpt = BACKEND.option("auto | onnxruntime | openvino | tensorrt | torch (auto: by the model file, as `ctmask "
                            "infer`).")
DeviceOpt = DEVICE.option()
ThreadsOpt = THREADS.option("CPU threads per replica (default: the backend's own choice for one replica; the cores "
                            "divided among several).")


@user_errors
def serve(
    model: Path = typer.Argument(..., help="ctmask ONNX model, TensorRT engine (.engine) or classifier checkpoint."),
    port: int = typer.Option(8000, "--port", help="HTTP port (1..65535)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    replicas: int = typer.Option(1, "--replicas", help="Replicas, each with its own runner."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most requests run in one inference call."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", help="How long a batch waits for more requests "
                                                                      "after its first (ms)."),
    backend: str = BackendOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body (MiB); larger: 413."),
    read_timeout_s: float = typer.Option(30.0, "--read-timeout-s", help="How long a request body may stall "
                                                                        "(no new bytes, s) before a 408."),
    top_rois: int = TOP_ROIS.option("RoI rows (and boxes) per answer.", bounded=False),
    force_modality: bool = FORCE_MODALITY.option("Predict DICOM of a modality other than CT."),
    hu_offset: float = HU_OFFSET.option(),
    uncropped: bool = UNCROPPED.option("Serve a model trained on body-cropped slices on whole slices (uploads carry "
                                       "no crop box)."),
    address: str | None = typer.Option(None, "--address", help="Join this Ray cluster (e.g. auto, ray://host:10001) "
                                                               "instead of starting a local Ray."),
    token_file: Path | None = typer.Option(None, "--token-file", help="File holding the bearer token every endpoint "
                                                                      "but /health wants (or set CTMASK_SERVE_TOKEN); "
                                                                      "401 without it."),
) -> None:
    """Serve a model over HTTP on Ray Serve until Ctrl-C / SIGTERM, with dynamic batching across requests.

    `POST /predict` with one slice (DICOM, PNG, JPEG, TIFF) as the raw body answers JSON: class, probs, top RoIs and
    their boxes in the slice's own pixels, the batch size it ran in and the model's identity; the slice is decoded
    exactly as `ctmask infer` decodes it. `GET /health`, `GET /metadata`, `GET /stats`. Errors are JSON
    `{"error", "status"}`: 400 empty body, 408 body stalled for --read-timeout-s, 413 too large, 415 not
    an image, 422 refused by the readers (or more than one slice), 404 / 405. Bad options and a model that cannot
    be loaded exit 2 before Ray starts. With a token (CTMASK_SERVE_TOKEN or --token-file), every endpoint but
    /health answers 401 without `Authorization: Bearer TOKEN`.
    """
    from ctmask.scale.serve import run_server

    run_server(model, token_file=token_file, echo=lambda text: typer.echo(text, err=True), port=port,
               replicas=replicas, max_batch=max_batch, batch_wait_ms=batch_wait_ms, host=host, backend=backend,
               device=device, threads=threads, max_body_mb=max_body_mb, address=address, top_rois=top_rois,
               force_modality=force_modality, hu_offset=hu_offset, uncropped=uncropped,
               read_timeout_s=read_timeout_s)


@user_errors
def bench_serve(
    model: Path = typer.Argument(..., help="The model the server runs (and the local reference runs)."),
    images: Path = typer.Option(..., "--images", help="Folder of slices (cycled over the requests)."),
    clients: str = typer.Option("1,4,16", "--clients", help="Concurrency levels, comma-separated: C threads each "
                                                            "sending requests one after another."),
    requests: int = typer.Option(200, "--requests", help="Requests per level."),
    url: str | None = typer.Option(None, "--url", help="Test a running server (default: start one on a free "
                                                       "loopback port and stop it after)."),
    replicas: int = typer.Option(1, "--replicas", help="Replicas of the server started here."),
    max_batch: int = typer.Option(8, "--max-batch", help="The started server's batch limit (and the reference "
                                                         "runner's batch)."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", help="The started server's batch wait (ms)."),
    backend: str = BackendOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    json_out: Path | None = JsonOpt,
) -> None:
    """Load-test `ctmask serve`: throughput, latency p50 / p99, batch sizes formed, non-200 and lost requests per
    concurrency level; every answer checked against the local runner's prediction of the same file; the same
    slices through the in-process runner for reference. Exit status 1 when any request is lost, mismatched or not
    answered 200."""
    from ctmask.core.errors import ConfigError
    from ctmask.scale.loadtest import format_report, run_loadtest

    try:
        levels = [int(c) for c in clients.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--clients takes comma-separated numbers, got {clients!r}") from None
    check_paths({"MODEL": model, "--images": images}, {"--json": json_out})
    echo = human_echo(json_out)
    if url is not None and (replicas, max_batch, batch_wait_ms) != (1, 8, 10.0):
        typer.secho("warning: --replicas / --batch-wait-ms apply to a server started here, not to --url; --max-batch "
                    "sets the reference runner's batch only", fg=typer.colors.YELLOW, err=True)

    def on_level(lv: dict) -> None:
        typer.echo(f"clients {lv['clients']}: {lv['throughput_rps']:.1f} req/s, p50 {lv['p50_ms']} ms, p99 "
                   f"{lv['p99_ms']} ms, non-200 {lv['non200']}, lost {lv['lost']}, mismatched {lv['mismatched']}",
                   err=True)

    report = run_loadtest(model, images, levels, requests, url, replicas, max_batch, batch_wait_ms, backend, device,
                          threads, on_level=on_level, on_note=lambda text: typer.echo(text, err=True))
    echo(format_report(report))
    emit_json(report, json_out)
    if not report["passed"]:
        raise typer.Exit(1)


COMMANDS = {"serve": serve, "bench-serve": bench_serve}
