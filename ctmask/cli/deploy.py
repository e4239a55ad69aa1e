"""Deployment commands: infer, parity, bench (export: :mod:`ctmask.cli.precision`).

``infer`` on an ONNX model never imports torch (a test enforces it): torch-backed
pieces are imported only when a checkpoint is run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from ctmask.backends.registry import make_runner
from ctmask.cli.common import (
    BACKEND,
    DEVICE,
    FORCE_MODALITY,
    HU_OFFSET,
    THREADS,
    TOP_ROIS,
    UNCROPPED,
    JsonOpt,
    QuietOpt,
    check_paths,
    emit_json,
    human_echo,
    split_images,
    user_errors,
)
from ctmask.cli.pacs import CaBundleOpt, CredentialsOpt, RetryForOpt, SpoolOpt, infer_dicomweb
from ctmask.core.errors import ConfigError
from ctmask.core.noise import NOISE_GRAY_LEVELS, describe_noise_floor

ResumeOpt = typer.Option(False, "--resume", help="Continue --out of an earlier (or killed) run: the slices already in "
                                                 "it (matched by SOPInstanceUID, else file content) are not "
                                                 "predicted again; new records are appended.")
BoxesOpt = typer.Option(None, "--boxes", help="COVIDx-CT split file with each slice's body crop box (needed by a "
                                              "model trained with --crop; matched by path, else by file name).")
RayOpt = typer.Option(False, "--ray", help="Run on Ray Data (pip install 'ctmask[ray]'): inputs listed and decoded "
                                           "in Ray tasks, one runner per actor; a local cluster unless --address. "
                                           "Same predictions as without.")
AddressOpt = typer.Option(None, "--address", help="With --ray: join this cluster ('auto', 'ray://HOST:10001') "
                                                  "instead of starting one.")
ActorsOpt = typer.Option(None, "--actors", help="With --ray: inference actors (default: one per GPU with "
                                                "--gpus-per-actor, else one per CPU, up to 16).")
CpusPerActorOpt = typer.Option(None, "--cpus-per-actor", help="With --ray: CPUs per actor (default: the cluster's, "
                                                              "shared).")


@user_errors
def infer(
    model: Path = typer.Argument(..., help="ctmask ONNX model, TensorRT engine (.engine), or a classifier checkpoint "
                                           "for the PyTorch path."),
    inputs: list[Path] = typer.Argument(None, help="Slices (PNG, JPEG, TIFF, DICOM), DICOM series folders (files "
                                                   "with or without .dcm), multi-frame DICOM, NIfTI volumes "
                                                   "(.nii, .nii.gz), or folders of them (none with --dicomweb)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Per-slice predictions: .jsonl, .csv or .parquet "
                                                              "(default: stdout)."),
    studies: Path | None = typer.Option(None, "--studies", help="Per-study predictions: .jsonl, .csv or .parquet."),
    overlays: Path | None = typer.Option(None, "--overlays", help="Folder for PNG overlays: each slice with its top "
                                                                  "lesion detections (box, class, score) drawn."),
    report: Path | None = typer.Option(None, "--report", help="Self-contained HTML report of the run (.html)."),
    dicom_out: Path | None = typer.Option(None, "--dicom-out", help="Folder for DICOM result objects, per study read "
                                                                    "from DICOM: a TID 1500 SR and a presentation "
                                                                    "state with the lesion boxes (docs/dicom.md)."),
    dicom_sc: bool = typer.Option(False, "--dicom-sc", help="With --dicom-out: also a Secondary Capture of each "
                                                            "driving slice's overlay."),
    resume: bool = ResumeOpt,
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Slices per inference call."),
    backend: str = BACKEND.option(),
    device: str = DEVICE.option(),
    threads: int | None = THREADS.option(),
    top_rois: int = TOP_ROIS.option(),
    study_top_k: int = typer.Option(5, "--study-top-k", min=1, help="Slices per class that drive a study's call "
                                                                     "(see docs/scans.md: Study-level prediction)."),
    force_modality: bool = FORCE_MODALITY.option(),
    hu_offset: float = HU_OFFSET.option(),
    boxes: Path | None = BoxesOpt,
    uncropped: bool = UNCROPPED.option(),
    use_ray: bool = RayOpt,
    address: str | None = AddressOpt,
    actors: int | None = ActorsOpt,
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", help="With --ray: GPUs per actor."),
    cpus_per_actor: float | None = CpusPerActorOpt,
    dicomweb: str | None = typer.Option(None, "--dicomweb", help="Pull the study from this DICOMweb server "
                                                                 "(QIDO-RS / WADO-RS) and store the results back "
                                                                 "(STOW-RS), e.g. http://pacs:8042/dicom-web."),
    study: str | None = typer.Option(None, "--study", help="With --dicomweb: the Study Instance UID."),
    series: str | None = typer.Option(None, "--series", help="With --dicomweb: only this Series Instance UID."),
    credentials: Path | None = CredentialsOpt,
    ca_bundle: Path | None = CaBundleOpt,
    spool: Path | None = SpoolOpt,
    retry_for: float = RetryForOpt,
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Predict normal / pneumonia / COVID-19 for every slice, in batches, and per study.

    Pre-processing (input size, DICOM window, body crop) follows the model's metadata. DICOM series are
    grouped by SeriesInstanceUID and ordered along the slice normal; studies by StudyInstanceUID (a NIfTI
    volume or a loose image is a study of its own). Every unreadable or refused input is reported (path and
    reason) and skipped; the rest are processed. Records reach --out as they are made (flushed after every
    batch: the file holds whole records at any moment; Parquet: in `<out>.journal.jsonl` until the end), so a
    killed run continues with --resume; one run at a time writes an output (`<out>.lock` names it). The other
    outputs appear only complete (written to a temporary file and renamed). No output may be an input or
    another output; outputs inside an input folder are never read as inputs, nor are the overlay PNGs of an
    earlier run (tagged `ctmask-overlay`; skipped with a warning). Exit status: 0 every slice
    predicted; 1 some inputs skipped (listed); 2 nothing could run (bad option, unreadable model, missing
    backend, an output over an input): nothing written.
    """
    from ctmask.runtime.batch_run import PredictOptions
    from ctmask.runtime.pipeline import InferEvents, InferRequest, run_infer
    from ctmask.scans.batch import ReadOptions

    echo = human_echo(json_out)
    predict = PredictOptions(batch_size, top_rois, uncropped=uncropped, read=ReadOptions(force_modality, hu_offset))
    events = InferEvents(note=echo, warn=_warn, prediction=_slice_line(echo) if out is None else None,
                         progress=not quiet)
    if dicomweb is not None or study is not None or series is not None:
        _check_dicomweb(dicomweb, study, inputs, {"--out": out, "--studies": studies, "--overlays": overlays,
                                                  "--report": report, "--resume": resume, "--boxes": boxes,
                                                  "--ray": use_ray, "--dicom-out": dicom_out}, model, json_out)
        return infer_dicomweb(model, str(dicomweb), str(study), series, credentials, ca_bundle, spool, retry_for,
                              predict, study_top_k, dicom_sc, backend, device, threads, events, json_out)
    guard = _check_outputs(out, studies, report, {"--overlays": overlays, "--dicom-out": dicom_out}, resume, model,
                           inputs, boxes, json_out, dicom_sc)
    engine = _engine(model, backend, device, threads, use_ray, address, actors, gpus_per_actor, cpus_per_actor)
    request = InferRequest(model, inputs, out, studies, overlays, report, resume, boxes, study_top_k, predict, guard,
                           dicom_out, dicom_sc)
    _finish(run_infer(request, engine, events), request, json_out)


def _engine(model: Path, backend: str, device: str, threads: int | None, use_ray: bool, address: str | None,
            actors: int | None, gpus_per_actor: float, cpus_per_actor: float | None):
    """Where ``infer`` runs: in this process on one runner, or on Ray (``--ray``: its options checked here)."""
    from ctmask.runtime.pipeline import LocalEngine

    def open_runner():
        return make_runner(model, backend, device, threads)

    if use_ray:
        from ctmask.scale.ray_batch import RayOptions
        from ctmask.scale.ray_infer import RayEngine

        return RayEngine(model, RayOptions(address, actors, gpus_per_actor, cpus_per_actor), backend, device,
                         threads, open_runner)
    ray_only = [n for n, v in (("--address", address), ("--actors", actors), ("--cpus-per-actor", cpus_per_actor))
                if v is not None] + (["--gpus-per-actor"] if gpus_per_actor else [])
    if ray_only:
        raise ConfigError(f"{', '.join(ray_only)} only apply with --ray")
    return LocalEngine(open_runner)


def _check_dicomweb(url: str | None, study: str | None, inputs: list[Path] | None, others: dict, model: Path,
                    json_out: Path | None) -> None:
    """--dicomweb needs --study, takes no INPUTS, and none of the file-run options."""
    check_paths({"MODEL": model}, {"--json": json_out})
    if url is None or study is None:
        raise ConfigError("--dicomweb URL and --study UID go together (--series UID: one series of the study)")
    if inputs:
        raise ConfigError("--dicomweb pulls its inputs from the server: give no INPUTS")
    given = [name for name, value in others.items() if value not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(given)}: not with --dicomweb (its records are in --json; its results go "
                          "back to the server)")


def _warn(message: str) -> None:
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def _slice_line(echo):
    """Prints each slice's prediction (no --out): name, class and probabilities."""

    def show(pred) -> None:
        probs = " ".join(f"{k}={v:.4f}" for k, v in pred.probs.items())
        # a file name that is not UTF-8 prints its odd bytes as \xNN (stdout is strict UTF-8)
        name = (pred.key or pred.file).encode("utf-8", "surrogateescape")
        echo(f"{name.decode('utf-8', 'backslashreplace')}\t{pred.class_name}\t{probs}")

    return show


def _finish(summary, request, json_out: Path | None) -> None:
    """The summary on stderr and in --json; exit 1 when some inputs were skipped."""
    _echo_summary(summary, request)
    emit_json(summary.to_dict(), json_out)
    if summary.failures:
        raise typer.Exit(1)


def _echo_summary(summary, request) -> None:
    """The skipped inputs, and the run in one line (stderr)."""
    for f in summary.failures:
        typer.secho(f"skipped {f.file}: {f.reason}", fg=typer.colors.YELLOW, err=True)
    described, n_studies, actors = summary.runner, len(summary.studies), (summary.ray or {}).get("actors")
    resumed = f" (+{summary.resumed} from the earlier run)" if summary.resumed else ""
    classes = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items())) or "none"
    typer.echo(f"predicted {summary.predicted} slices{resumed} ({classes}) in "
               f"{n_studies} stud{'y' if n_studies == 1 else 'ies'}, skipped {len(summary.failures)}, in "
               f"{summary.seconds:.2f} s on {described.get('provider', described['backend'])}"
               + (f" in {actors} Ray actor(s)" if actors else "")
               + "".join(f"; wrote {p}" for p in (request.out, request.studies, request.report) if p is not None)
               + (f"; overlays in {request.overlays}" if request.overlays is not None else "")
               + (f"; DICOM objects of {len(summary.dicom or [])} stud{'y' if len(summary.dicom or []) == 1 else 'ies'}"
                  f" in {request.dicom_out}" if request.dicom_out is not None else ""), err=True)


def _check_outputs(out: Path | None, studies: Path | None, report: Path | None, folders: dict[str, Path | None],
                   resume: bool, model: Path, inputs: list[Path] | None, boxes: Path | None, json_out: Path | None,
                   dicom_sc: bool):
    """Refuse bad output options before anything runs (exit 2, nothing written): no INPUTS, the formats,
    and every output against every input and each other (:func:`ctmask.cli.common.check_paths`).
    Returns the checked outputs (what an input listing leaves out)."""
    if not inputs:
        raise ConfigError("no INPUTS: give slices, series folders or volumes (or --dicomweb URL --study UID)")
    if dicom_sc and folders.get("--dicom-out") is None:
        raise ConfigError("--dicom-sc adds Secondary Captures to --dicom-out: pass --dicom-out DIR")
    from ctmask.core.outputs import lock_path
    from ctmask.runtime.predict import journal_path

    sidecars = {} if out is None else {"--out's lock file": lock_path(out)}
    if out is not None and out.suffix.lower() == ".parquet":
        sidecars["--out's journal"] = journal_path(out)
    checked = check_paths({"MODEL": model, "INPUTS": inputs, "--boxes": boxes},
                          {"--out": out, "--studies": studies, "--report": report, "--json": json_out, **sidecars},
                          folders)
    tables = (".jsonl", ".csv", ".parquet")
    for opt, path, suffixes in (("--out", out, tables), ("--studies", studies, tables),
                                ("--report", report, (".html", ".htm"))):
        if path is not None and path.suffix.lower() not in suffixes:
            raise ConfigError(f"{opt} {path}: use {' or '.join(suffixes)}")
    if resume and out is None:
        raise ConfigError("--resume continues the predictions file of an earlier run: pass --out FILE")
    return checked


@user_errors
def parity(
    checkpoint: Path = typer.Argument(..., help="Classifier checkpoint (the PyTorch reference)."),
    model: Path = typer.Argument(..., help="ONNX model exported from it, or a TensorRT engine built from that."),
    images: list[Path] = typer.Option(..., "--images", help="Slices or folders (repeatable)."),
    max_images: int = typer.Option(64, min=1, help="Compare on the first N slices."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    min_argmax_agreement: float | None = typer.Option(None, help="Required fraction of identical class calls "
                                                                 "(default: ctmask's table: 1.0 for fp32, 0.995 "
                                                                 "fp16, 0.99 int8)."),
    fp32: Path | None = typer.Option(None, "--fp32", help="The FP32 graph a reduced-precision graph was made "
                                                          "from: its class calls and accuracy are reported too."),
    labels: Path | None = typer.Option(None, "--labels", help="COVIDx-CT split file with the slices' classes: "
                                                              "accuracy of each side and the change against FP32."),
    polygraphy: Path | None = typer.Option(None, help="Also save inputs + PyTorch outputs here for Polygraphy (for "
                                           "an INT8 graph with a fake-quantized reference, that model's outputs)."),
    jitter: float = typer.Option(1e-6, min=0.0, help="Input noise of the stability probe for failing slices "
                                                     "(0: off)."),
    noise: bool = typer.Option(True, "--noise/--no-noise", help="Also report the model's noise floor: PyTorch's "
                                                                  "calls changed by seeded input noise of +-0.25 "
                                                                  "and +-1 gray level."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run PyTorch and the exported graph on the same tensors; judge every output.

    Tolerances come from ctmask's own table for the precision the graph declares. RoI rows are matched one to
    one against PyTorch's ranking of N + 64 candidates; near-tied rows may trade places only within the order
    tolerance. Exit status 1 when any line fails or fewer class calls agree end to end than the precision
    requires (FP32 100%, FP16 99.5%, INT8 99%; an FP16 / INT8 graph may also exceed the row and logit
    tolerances on at most 10% of the slices). A failing slice on which
    PyTorch itself moves by at least half the graph's error under +-jitter input noise (a top-k / NMS decision
    on a knife edge) is reported with both figures and judged out, up to 5% of the slices.
    """
    from ctmask.backends.parity import check_parity
    from ctmask.core.progress import progress

    check_paths({"CHECKPOINT": checkpoint, "MODEL": model, "--images": images, "--fp32": fp32, "--labels": labels,
                 "its slices": split_images(labels)}, {"--json": json_out}, {"--polygraphy": polygraphy})
    with contextlib.ExitStack() as stack:
        advance = [lambda n=1: None]

        def on_start(n: int) -> None:
            advance[0] = stack.enter_context(progress(n, "parity", not quiet))

        report = check_parity(checkpoint, model, images, max_images, batch_size, min_argmax_agreement, polygraphy,
                              on_batch=lambda n: advance[0](n), on_start=on_start, jitter=jitter, fp32_model=fp32,
                              labels=labels, noise_levels=NOISE_GRAY_LEVELS if noise else ())
    for w in report["warnings"]:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    for s in report["skipped"]:
        typer.secho(f"skipped {s['file']}: {s['error']}", fg=typer.colors.YELLOW, err=True)
    human_echo(json_out)(format_parity(report))
    emit_json(report, json_out)
    if polygraphy is not None:
        t = report["tolerances"]
        if "int8_reference" in report:
            typer.echo("the saved reference outputs are the fake-quantized model's; Polygraphy compares them element "
                       "by element, which INT8 rows do not meet where rounding reorders candidates (parity judges "
                       "them in aggregate)", err=True)
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
    aggregate = report.get("int8_reference", {}).get("rows", {})
    for name, r in report["outputs"].items():
        verdict = "pass" if r["passed"] else f"FAIL ({r['n_failing']} elements)"
        if name in aggregate:
            verdict = f"{r['n_failing']} elements off: judged in aggregate below"
        lines.append(f"{name:<13}{r['max_abs']:>11.3g}{r['mean_abs']:>11.3g}{r['max_rel']:>11.3g}"
                     f"{r['required_atol']:>13.3g}{r['atol']:>9.0e}{r['rtol']:>8.0e}  {verdict}")
    c = report["rois"]
    bad = c["unmatched"] + c["missing"] + c["intruders"] + c["bad_padding"]
    lines.append(f"rois.rows: {c['rows']} real rows; unmatched {c['unmatched']}, missing {c['missing']}, "
                 f"intruders {c['intruders']}, bad padding {c['bad_padding']}  "
                 + ("judged in aggregate below" if aggregate else "pass" if not bad else "FAIL"))
    lines += _int8_reference_lines(report)
    lines.append(f"near-ties: {c['reordered']} row(s) reordered, {c['cut_swaps']} swapped at the N cut, in "
                 f"{len(c['permuted_slices'])} slice(s) (logits there judged against torch S on the reference's "
                 "rows in the graph's order)")
    for name, m in report.get("metadata_mismatches", {}).items():
        lines.append(f"metadata: the graph's {name} {m['graph']!r} differs from the checkpoint's {m['checkpoint']!r}  "
                     "FAIL")
    against = " against PyTorch FP32" if aggregate else ""
    lines.append(f"class agreement (end to end{against}) {report['argmax_agreement']:.2%} "
                 f"(required {report['min_argmax_agreement']:.1%})"
                 + (f"; with the fake-quantized model {report['argmax_agreement_fakequant']:.2%}" if aggregate else ""))
    d = report.get("decisions", {})
    if "agreement_vs_fp32_graph" in d:
        lines.append(f"class agreement with the FP32 graph {d['agreement_vs_fp32_graph']:.2%} "
                     f"({d['changed_vs_fp32_graph']} call(s) changed)")
    if "accuracy" in d:
        acc = ", ".join(f"{k} {v:.2%}" for k, v in d["accuracy"].items())
        lines.append(f"accuracy on {d['labelled']} labelled slices: {acc}; change against FP32 "
                     f"{100 * d['accuracy_change_vs_fp32']:+.2f} points")
    if report.get("off_tolerance_slices") or report.get("off_tolerance_candidates"):
        lines.append(f"off tolerance ({report['precision']}): {len(report['off_tolerance_slices'])} slice(s) excused "
                     f"of {report['off_tolerance_candidates']} outside the row / logit tolerances (at most "
                     f"{report['off_tolerance_allowed']} may be)")
    for item in report["probed_slices"]:
        own = ", ".join(f"{k} {item['graph_max_abs'][k]:.3g} vs {v:.3g}"
                        for k, v in item["reference_jitter_max_abs"].items())
        verdict = "unstable slice (judged out)" if item["judged_out"] else "probed, not judged out"
        lines.append(f"  {verdict} {item['file']}: graph error vs PyTorch's own movement under input jitter: {own}")
    if report.get("probe_skipped"):
        lines.append(f"stability probe skipped: {len(report['failing_slices'])} of {report['n_images']} slices fail, "
                     "more than may ever be judged out")
    slices = report.get("failing_slices", [])
    if aggregate and slices:  # every line judged in aggregate: list the class flips first
        slices = sorted(slices, key=lambda f: "class" not in f["max_abs"])
        lines.append(f"{len(slices)} of {report['n_images']} slices are outside the int8 tolerances on some line "
                     "(row lines judged in aggregate above); class flips against FP32 first:")
    for item in slices[:10]:
        errs = ", ".join(f"{k} {v:.3g}" for k, v in item["max_abs"].items())
        lines.append(f"  {'slice' if aggregate else 'failing slice'} {item['file']}: {errs}")
    if "noise_floor" in report:
        lines.append(f"PyTorch's {describe_noise_floor(report['noise_floor'])} (head {report.get('head', 'paper')})")
    lines.append("PASSED" if report["passed"] else "FAILED: " + ", ".join(report["failures"]))
    if not report["passed"] and "class" in report["failures"] and report["precision"] != "fp32":
        lines.append(noise_floor_advice(report))
    return "\n".join(lines)


def _int8_reference_lines(report: dict) -> list[str]:
    """An INT8 graph judged against its fake-quantized model: the aggregate row lines and int8.tensors."""
    ref = report.get("int8_reference")
    if not ref:
        return []
    lines = [f"INT8 reference: the checkpoint fake-quantized at the graph's scales (ModelOpt); on each row line the "
             f"graph's mean error over all slices and on its worst slice (rois.rows: bad rows) may be at most "
             f"{ref['row_factor']:g}x that model's own under +-{ref['row_noise_gray_levels']:g} gray level of seeded "
             f"input noise (the largest of {ref['row_noise_draws']} draws), plus {ref['row_floor']:.0%} of the "
             f"line's atol ({ref['row_slack_rows']} rows):"]
    for name, r in ref["rows"].items():
        lines.append(f"  {name:<13} graph {r['graph']:>9.4g} (worst slice {r['graph_worst_slice']:>8.4g})  model under "
                     f"noise {r['reference_under_noise']:>9.4g} ({r['reference_worst_slice']:>8.4g})  allowed "
                     f"{r['allowed']:>9.4g} ({r['allowed_worst_slice']:>8.4g})  " + ("pass" if r["passed"] else "FAIL"))
    t = ref["tensors"]
    lim = t["limits"]
    lines.append(f"int8.tensors: {t['tensors']} quantized activations of the backbone, FPN and RPN head on "
                 f"{t['slices']} slice(s): {t['beyond_one_step']:.2%} of {t['values']} values more than one int8 "
                 f"step from the model's (at most {lim['beyond_one_step']:.0%}), the largest {t['max_steps']:.0f} "
                 f"steps at {t['worst_quantizer'] or '-'} (at most {lim['max_steps']:g})"
                 + (f"; not found in the model: {', '.join(t['unmatched'][:3])}" if t["unmatched"] else "")
                 + (f" ({t['not_compared']})" if t.get("not_compared") else "")
                 + ("  pass" if t["passed"] else "  FAIL"))
    w = ref.get("weights")
    if w:
        lines.append(f"int8.weights: {w['weights']} int8 weight tensors against the checkpoint's (BatchNorm folded): "
                     f"at most {w['max_steps']:.3g} of a channel's steps off at {w['worst_module'] or '-'} (at most "
                     f"{w['limit_steps']:g}: the rounding)" + "".join(f"; {p}" for p in w["problems"][:3])
                     + ("  pass" if w["passed"] else "  FAIL"))
        grids = w.get("mismatched_grids", [])
        lines.append("int8.grids: every DequantizeLinear reads its QuantizeLinear's grid  pass" if not grids else
                     f"int8.grids: {len(grids)} DequantizeLinear(s) read another grid: {'; '.join(grids[:3])}  FAIL")
    if report["n_images"] < ref.get("min_slices", 0):
        lines.append(f"int8.slices: {report['n_images']} slice(s) give no usable estimate of the model's own movement "
                     f"(at least {ref['min_slices']})  FAIL")
    return lines


def noise_floor_advice(report: dict) -> str:
    """Why a reduced-precision graph lost class calls, put against the model's own noise floor."""
    floor = report.get("noise_floor")
    lost = round((1.0 - report.get("argmax_agreement", 1.0)) * report.get("n_images", 0))
    if not floor:
        return "why: the model's noise floor was not measured (parity measures it unless --no-noise)."
    level = floor["levels"][0]
    own = (f"the model itself changes {level['changed_calls']} of {floor['n']} calls under "
           f"+-{level['gray_levels']:g} gray level of input noise (its noise floor)")
    if report.get("head", "paper") == "paper":
        return (f"why: {own}; this graph loses {lost}. The paper's S reads the ranked rows by position, so every "
                "near-tied row that reduced precision reorders can move its call; a head whose calls move "
                "continuously with the candidates keeps them: `ctmask train-cls SEG --variant heads --head pooled` "
                "(docs/model.md, \"Stable head\").")
    if level["changed_calls"] >= lost:
        return f"why: {own}, as many as this graph loses ({lost}): calls that fragile cannot survive reduced precision."
    return (f"why: {own}, fewer than the {lost} this graph loses: the loss is the reduced precision's own. Keep "
            "more blocks FP32 (`export` measures islands on --measure-size slices) or calibrate on more slices "
            "(--calibration-size, --method).")


@user_errors
def bench(
    models: list[Path] = typer.Argument(..., metavar="MODEL",
                                        help="ctmask ONNX graphs of one model (e.g. its FP32, FP16 and INT8 "
                                             "graphs; same preset and input size), measured in the same run."),
    backend: list[str] | None = typer.Option(None, "--backend",
                                             help="torch-cpu, torch-cuda, onnxruntime-cpu, onnxruntime-cuda, "
                                                  "openvino-cpu (repeatable; default: every available one), and "
                                                  "openvino-bf16 (OpenVINO's bf16 precision hint; only when "
                                                  "named: it changes class calls)."),
    batch_size: list[int] = typer.Option([1, 8], "--batch-size", "-b", help="Batch sizes (repeatable)."),
    checkpoint: Path | None = typer.Option(None, help="Checkpoint for the PyTorch reference (default: the one "
                                                      "named in the first model's metadata, if present and "
                                                      "unchanged)."),
    images: Path | None = typer.Option(None, help="Folder of slices to run (default: synthetic slices)."),
    warmup: int = typer.Option(2, min=0),
    iterations: int = typer.Option(10, min=1),
    threads: int | None = typer.Option(None, help="CPU threads for every backend (default: each one's own "
                                                  "choice)."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Latency p50/p90/p99, throughput and peak memory of every model on every backend, on the same
    inputs; ratios over PyTorch (vs torch) and over the FP32 graph on the same backend (vs fp32)."""
    from ctmask.backends.registry import bench_resolvers, plan_models
    from ctmask.runtime.bench import run_plan

    check_paths({"MODEL": models, "--checkpoint": checkpoint, "--images": images}, {"--json": json_out})
    plan = plan_models(models, backend, bench_resolvers(checkpoint, threads))
    for name, why in plan.skipped.items():
        typer.secho(f"not benchmarked: {name}: {why}", fg=typer.colors.YELLOW, err=True)
    report = run_plan(plan, batch_size, images, warmup, iterations, not quiet)
    names = {m["model"]: m["name"] for m in report["models"]}
    for item in report["not_benchmarked"]:
        typer.secho(f"not benchmarked: {item['backend']} {names.get(item['model'], item['model'])}: "
                    f"{item['reason']}", fg=typer.colors.YELLOW, err=True)
    if not report["results"]:
        raise ConfigError("nothing could be benchmarked (see the lines above)")
    human_echo(json_out)(format_bench(report))
    emit_json(report, json_out)


def format_bench(report: dict) -> str:
    """The bench table: one row per backend, model and batch size, with its ratios over
    PyTorch (``vs torch``) and over the FP32 graph on the same backend (``vs fp32``)."""
    from ctmask.runtime.bench import precision_label

    names = {m["model"]: m["name"] for m in report.get("models", [])}

    def name_of(r: dict) -> str:
        model = r.get("model") or report.get("model", "")
        return names.get(model) or Path(model).name

    def ratio(table: dict, r: dict) -> str:
        value = table.get(r["backend"], {}).get(r.get("model"), {}).get(r["batch_size"])
        if value is None:  # read back from JSON: batch sizes are strings there
            value = table.get(r["backend"], {}).get(r.get("model"), {}).get(str(r["batch_size"]))
        return f"{value:.2f}x" if value is not None else "-"

    width = max([len("model")] + [len(name_of(r)) for r in report["results"]]) + 2
    lines = [f"{'backend':<18}{'model':<{width}}{'precision':<17}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}"
             f"{'p99 ms':>10}{'slices/s':>10}{'+RSS MB':>9}{'peak MB':>9}{'vs torch':>10}{'vs fp32':>9}"]
    ref = report.get("reference")
    for r in report["results"]:
        vs_torch = "1.00x" if r["backend"] == ref else ratio(report.get("speedup_vs_torch", {}), r) if ref else "-"
        vs_fp32 = ratio(report.get("speedup_vs_fp32", {}), r)
        added = f"{r['added_rss_mb']:.0f}" if r.get("added_rss_mb") is not None else "-"
        peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
        precision = precision_label(r.get("precision", "fp32"), r.get("int8_target"))
        lat = r["latency_ms"]
        lines.append(f"{r['backend']:<18}{name_of(r):<{width}}{precision:<17}{r['batch_size']:>6}"
                     f"{lat['p50']:>10.1f}{lat['p90']:>10.1f}{lat['p99']:>10.1f}{r['throughput']:>10.2f}"
                     f"{added:>9}{peak:>9}{vs_torch:>10}{vs_fp32:>9}")
    return "\n".join(lines)


COMMANDS = {"infer": infer, "parity": parity, "bench": bench}
