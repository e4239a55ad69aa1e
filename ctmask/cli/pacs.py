"""PACS commands: ``listen`` (a DIMSE storage SCP that predicts what it receives), and the
``--dicomweb`` side of ``infer`` (:func:`infer_dicomweb`, called by ``ctmask infer``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from ctmask.backends.registry import make_runner
from ctmask.cli.common import (
    BACKEND,
    DEVICE,
    FORCE_MODALITY,
    THREADS,
    TOP_ROIS,
    JsonOpt,
    emit_json,
    human_echo,
    user_errors,
)
from ctmask.core.errors import ConfigError

CredentialsOpt = typer.Option(None, "--credentials", help="JSON file with the PACS credentials ({\"token\": ...} or "
                                                          "{\"username\": ..., \"password\": ...}; chmod 600); "
                                                          "default: CTMASK_PACS_TOKEN, or CTMASK_PACS_USER and "
                                                          "CTMASK_PACS_PASSWORD. Never on the command line.")
CaBundleOpt = typer.Option(None, "--ca-bundle", help="CA certificates (PEM) to verify the PACS's TLS certificate "
                                                     "against (default: the system's; verification is always on).")
SpoolOpt = typer.Option(None, "--spool", help="Folder where results wait for the PACS (default: "
                                              "$XDG_CACHE_HOME/ctmask/spool, else ~/.cache/ctmask/spool).")
RetryForOpt = typer.Option(300.0, "--retry-for", min=0.0, help="Seconds to keep trying a PACS that is unreachable "
                                                               "or answers 5xx (doubling waits from 1 s).")


def default_spool() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctmask" / "spool"


def plain_http_warning(url: str, credentials: bool) -> str | None:
    """The warning for credentials sent over plain HTTP beyond this machine, else None."""
    from urllib.parse import urlsplit

    from ctmask.pacs.dimse import is_loopback

    parts = urlsplit(url)
    if not credentials or parts.scheme.lower() != "http" or is_loopback(parts.hostname or ""):
        return None
    return f"--dicomweb {url}: the PACS credentials go over plain HTTP, readable on the network: use https://"


def infer_dicomweb(model: Path, url: str, study: str, series: str | None, credentials: Path | None,
                   ca_bundle: Path | None, spool: Path | None, retry_for: float, predict, study_top_k: int,
                   dicom_sc: bool, backend: str, device: str, threads: int | None, events,
                   json_out: Path | None) -> None:
    """``ctmask infer --dicomweb``: the study pulled, predicted, its results stored back (exit 1
    when a series or slice was refused or a result is still in the spool)."""
    from ctmask.pacs.auth import http_session, read_credentials
    from ctmask.pacs.dicomweb import DicomWeb
    from ctmask.pacs.pull import infer_dicomweb as run
    from ctmask.pacs.retry import Backoff
    from ctmask.pacs.study import StudySettings

    if not url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"--dicomweb {url!r}: want the DICOMweb root URL, e.g. http://127.0.0.1:8042/dicom-web")
    from urllib.parse import urlsplit

    from ctmask.pacs import is_uid

    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        # a user / password in the URL is on the command line (ps, shell history) and in every message
        raise ConfigError("--dicomweb: the URL holds credentials (user:password@): never on the command line",
                          hint="set CTMASK_PACS_USER / CTMASK_PACS_PASSWORD, CTMASK_PACS_TOKEN or --credentials FILE")
    for flag, uid in (("--study", study), ("--series", series)):
        if uid is not None and not is_uid(uid):
            raise ConfigError(f"{flag} {uid[:80]!r}: not a DICOM UID (digits and dots, at most 64 characters)")
    creds = read_credentials(os.environ, credentials)
    plain = plain_http_warning(url, creds.kind != "none")
    if plain:
        events.warn(plain)
    session = http_session(creds, ca_bundle)
    backoff = Backoff(first=1.0, longest=30.0, total=retry_for)
    web = DicomWeb(url, session, backoff, on_retry=lambda why, wait: events.warn(f"{why}: trying again in {wait:g} s"))
    result = run(web, study, series, StudySettings(model, predict, study_top_k, dicom_sc), spool or default_spool(),
                 lambda: make_runner(model, backend, device, threads), backoff, events)
    for f in result.failures:
        typer.secho(f"skipped {f.file}: {f.reason}", fg=typer.colors.YELLOW, err=True)
    summary = result.result.summary if result.result is not None else None
    if summary is not None:
        classes = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items())) or "none"
        typer.echo(f"predicted {summary.predicted} slices ({classes}) of study {study} from {web.url}, skipped "
                   f"{len(result.failures)}, in {summary.seconds:.2f} s", err=True)
    typer.echo(result.sent.status(), err=True)
    emit_json(result.to_dict(), json_out)
    if result.failures or not result.sent.ok:
        raise typer.Exit(1)


@user_errors
def listen(
    model: Path = typer.Argument(..., help="ctmask ONNX model or TensorRT engine."),
    dest: str = typer.Option(..., "--dest", help="Where results go by C-STORE: HOST:PORT:AE (e.g. "
                                                 "127.0.0.1:4242:ORTHANC)."),
    ae: str = typer.Option("CTMASK", "--ae", help="This SCP's AE title."),
    port: int = typer.Option(11112, "--port", min=1, max=65535, help="DICOM port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    allow: list[str] = typer.Option([], "--allow", help="Calling AE title accepted (repeatable); others are refused. "
                                                        "Default: any (a warning beyond loopback)."),
    idle: float = typer.Option(10.0, "--idle", min=0.0, help="A study is complete when no instance of it came for "
                                                             "this many seconds."),
    work: Path = typer.Option(Path("ctmask-listen"), "--work", help="Folder for the instances received, the "
                                                                     "records of each study and the spool."),
    exit_after: int | None = typer.Option(None, "--exit-after", min=1, help="Stop once this many studies are "
                                                                            "done: results stored, or found "
                                                                            "unpredictable (default: run until "
                                                                            "interrupted)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Slices per inference call."),
    backend: str = BACKEND.option(),
    device: str = DEVICE.option(),
    threads: int | None = THREADS.option(),
    top_rois: int = TOP_ROIS.option(),
    force_modality: bool = FORCE_MODALITY.option(),
    dicom_sc: bool = typer.Option(False, "--dicom-sc", help="Also send a Secondary Capture of each driving slice's "
                                                           "overlay (for viewers without presentation states)."),
    json_out: Path | None = JsonOpt,
) -> None:
    """Receive studies by DICOM C-STORE, predict each once complete, and C-STORE its results to --dest.

    A study is complete when no instance of it came for --idle seconds; it is predicted by the `ctmask infer`
    pipeline (the same readers, limits and refusals: non-CT series and localizers refused and named, the CT
    series predicted), its records written to `<work>/results/<study UID>/`. Results wait in `<work>/spool`
    until the destination has them: a destination that is down is tried again with doubling waits, and what it
    has not taken at exit is sent first by the next `listen`. Calling AE titles outside --allow are refused.
    Stops on Ctrl-C (or --exit-after); exit status 1 when results are still in the spool, or a study or
    some of its instances were refused.
    """
    from ctmask.pacs.dimse import Destination, exposure_warning
    from ctmask.pacs.listen import Listener, ListenOptions
    from ctmask.pacs.study import StudySettings
    from ctmask.runtime.batch_run import PredictOptions
    from ctmask.runtime.pipeline import InferEvents
    from ctmask.scans.batch import ReadOptions

    echo = human_echo(json_out)
    options = ListenOptions(Destination.parse(dest), work, ae, host, port, tuple(allow), idle)
    exposed = exposure_warning(host, options.allow)
    if exposed:
        typer.secho(f"warning: {exposed}", fg=typer.colors.YELLOW, err=True)
    settings = StudySettings(model, PredictOptions(batch_size, top_rois, read=ReadOptions(force_modality)),
                             dicom_sc=dicom_sc)
    events = InferEvents(note=echo, warn=lambda m: typer.secho(f"warning: {m}", fg=typer.colors.YELLOW, err=True))
    listener = Listener(options, settings, lambda: make_runner(model, backend, device, threads), events)
    listener.start()
    echo(f"listening on {host}:{port} as {options.ae}; results to {options.dest}; Ctrl-C stops")
    try:
        while exit_after is None or not listener.wait_for(exit_after, 0.5):
            time.sleep(0.5 if exit_after is None else 0)
    except KeyboardInterrupt:
        echo("stopping: the studies still incoming are predicted, then one last send")
    report = listener.stop()
    echo(report.status())
    emit_json({"studies": [vars(s) for s in listener.done], "results": report.to_dict()}, json_out)
    if not report.ok or any(s.error is not None or s.summary.get("skipped") for s in listener.done):
        raise typer.Exit(1)


COMMANDS = {"listen": listen}
