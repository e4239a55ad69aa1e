"""The infer pipeline as one function: :func:`run_infer` (what ``ctmask infer`` runs).

Given the model, the inputs and the outputs (:class:`InferRequest`), it lists the inputs,
leaves out this run's own outputs, an earlier run's overlays and (``resume``) the slices an
earlier run predicted, predicts the rest in batches, writes the records to ``out`` as they
are made (flushed after every batch), draws the overlays, aggregates and writes the studies,
and writes the HTML report. It returns an :class:`InferSummary`.

Where the slices are listed and predicted is an :class:`Engine`: :class:`LocalEngine` (this
process, one runner) or ``ctmask.scale.ray_infer.RayEngine`` (a Ray cluster). The engine is
made by the caller, which picks the backend: the pipeline itself imports no backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ctmask.core.outputs import OutputPaths
from ctmask.core.spec import GraphSpec
from ctmask.runtime.batch_run import PredictOptions, Resume, predict_sources
from ctmask.runtime.predict import CropBoxes, Prediction, PredictionWriter, check_crop
from ctmask.runtime.runner import Runner
from ctmask.scans.types import DecodedSlice, Failure, SliceRef

Item = tuple[Prediction, DecodedSlice | None] | Failure
"""What an engine yields per slice: ``(prediction, decoded slice or None)`` or a failure."""


class Engine(Protocol):
    """Where the slices are listed and predicted."""

    def start(self, stack: ExitStack, inputs: list[Path], force_modality: bool) -> tuple[GraphSpec, list[SliceRef],
                                                                                          list[Failure]]:
        """Open what the run needs (a runner, a cluster) on ``stack``; list the inputs: the
        model's spec, the slices and the inputs refused."""
        ...

    def predict(self, refs: list[SliceRef], spec: GraphSpec, options: PredictOptions, overlays: Path | None,
                on_batch: Callable[[int], None]) -> Iterator[Item]:
        """Every slice's prediction, in input order (:func:`~ctmask.runtime.batch_run.predict_sources`)."""
        ...

    def describe(self) -> dict:
        """The runner that ran (``runner.describe()``), while ``stack`` is open."""
        ...

    def stats(self) -> dict | None:
        """What the engine itself did, for the summary (Ray's cluster and actors), or None."""
        ...


class LocalEngine:
    """The slices listed, decoded and predicted in this process on one runner, made by
    ``open_runner`` (e.g. ``lambda: make_runner(model, backend, device, threads)``) once
    the inputs are listed."""

    def __init__(self, open_runner: Callable[[], AbstractContextManager[Runner]]):
        self._open_runner = open_runner
        self._runner: Runner | None = None

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            raise RuntimeError("LocalEngine.start first")
        return self._runner

    def start(self, stack: ExitStack, inputs: list[Path], force_modality: bool) -> tuple[GraphSpec, list[SliceRef],
                                                                                          list[Failure]]:
        from ctmask.scans.listing import collect_sources

        refs, failures = collect_sources(inputs, force_modality=force_modality)
        self._runner = stack.enter_context(self._open_runner())
        return self.runner.spec, refs, failures

    def predict(self, refs: list[SliceRef], spec: GraphSpec, options: PredictOptions, overlays: Path | None,
                on_batch: Callable[[int], None]) -> Iterator[Item]:
        return predict_sources(self.runner, refs, options, on_batch=on_batch)

    def describe(self) -> dict:
        return self.runner.describe()

    def stats(self) -> dict | None:
        return None


def _nothing(message: str) -> None:
    pass


@dataclass(frozen=True)
class InferEvents:
    """What :func:`run_infer` tells its caller while it runs.

    Attributes:
        note: a line about the run (``resume: N slice(s) already in ...``).
        warn: a warning (the caller prints ``warning: <text>``).
        prediction: each slice's prediction as it is made.
        progress: show a progress bar on stderr.
    """

    note: Callable[[str], None] = _nothing
    warn: Callable[[str], None] = _nothing
    prediction: Callable[[Prediction], None] | None = None
    progress: bool = False


@dataclass(frozen=True)
class InferRequest:
    """One ``ctmask infer`` run (its options; see ``ctmask infer --help``).

    Attributes:
        model: the model file (named in the report and the warnings).
        inputs: slices, series folders, volumes, folders of them.
        out / studies / report: per-slice records, per-study records, HTML report (or None).
        overlays: folder for the PNG overlays (or None).
        resume: continue ``out`` of an earlier run (its slices are not predicted again).
        boxes: split file with each slice's body crop box (a model trained on cropped slices).
        study_top_k: slices per class that drive a study's call.
        predict: batch size, RoI rows, ``uncropped``, how slices are read (its ``boxes`` and
            ``keep_pixels`` are set from ``boxes`` and ``overlays``).
        exclude: this run's checked outputs (:func:`ctmask.core.outputs.check_outputs`): what
            an input listing leaves out.
        dicom_out: folder for the DICOM result objects, per study (SR TID 1500, GSPS;
            :mod:`ctmask.runtime.dicom_out`), or None; only studies read from DICOM get them.
        dicom_sc: with ``dicom_out``, also a Secondary Capture of each driving slice's overlay.
    """

    model: Path
    inputs: list[Path]
    out: Path | None = None
    studies: Path | None = None
    overlays: Path | None = None
    report: Path | None = None
    resume: bool = False
    boxes: Path | None = None
    study_top_k: int = 5
    predict: PredictOptions = PredictOptions()
    exclude: OutputPaths | None = None
    dicom_out: Path | None = None
    dicom_sc: bool = False

    @property
    def command(self) -> str:
        """The command line the output lock and the report name."""
        return " ".join(["ctmask infer", *map(str, [self.model, *self.inputs])])


@dataclass
class InferSummary:
    """What a run did.

    Attributes:
        counts: this run's predictions per class; ``records``: every slice record (an earlier
            run's first, with ``resume``); ``studies``: the study records.
        failures: the inputs and slices skipped, and why.
        resumed: records taken over from the earlier run; ``ray``: Ray's stats, or None.
        dicom: the DICOM files written per study (``dicom_out``: ``{"study", "sr", "gsps", "sc"}``).
    """

    model: Path
    runner: dict
    counts: dict[str, int]
    records: list[dict]
    studies: list[dict]
    failures: list[Failure]
    seconds: float
    out: Path | None
    crop: bool
    resumed: int
    ray: dict | None = None
    dicom: list[dict] | None = None

    @property
    def predicted(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        """The ``--json`` summary."""
        summary = {"model": str(self.model), "runner": self.runner, "predicted": self.predicted,
                   "classes": self.counts, "studies": self.studies, "skipped": [f.to_dict() for f in self.failures],
                   "seconds": round(self.seconds, 3), "out": None if self.out is None else str(self.out),
                   "crop": self.crop, "resumed": self.resumed}
        if self.ray is not None:
            summary["ray"] = self.ray
        if self.dicom is not None:
            summary["dicom"] = self.dicom
        if self.out is None:
            summary["predictions"] = self.records
        return summary


@dataclass
class _Run:
    """One run's state between the steps."""

    request: InferRequest
    events: InferEvents
    options: PredictOptions
    earlier: Resume | None = None
    failures: list[Failure] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    infer_seconds: float = 0.0


def run_infer(request: InferRequest, engine: Engine, events: InferEvents = InferEvents()) -> InferSummary:
    """Run ``ctmask infer``: predict every slice of ``request.inputs`` on ``engine``, write the
    outputs, and say what was done.

    Every unreadable or refused input is a failure in the summary; the rest are processed. One
    run at a time writes ``out`` (its lock names the holder); the other outputs appear only
    complete.

    Raises:
        ConfigError / DataError / ModelError ...: bad options, an earlier output that is not
            ctmask's (``resume``), a model that cannot run; nothing predicted.
    """
    t0 = time.perf_counter()
    if request.dicom_out is not None:
        from ctmask.runtime.dicom_out import require_highdicom

        require_highdicom()
    boxes = CropBoxes.from_split(request.boxes) if request.boxes is not None else None
    run = _Run(request, events, dataclasses.replace(request.predict, boxes=boxes,
                                                    keep_pixels=request.overlays is not None))
    with ExitStack() as stack:
        run.earlier = _lock_output(stack, request)
        run.records = list(run.earlier.records) if run.earlier is not None else []
        spec, refs, run.failures = engine.start(stack, request.inputs, request.predict.read.force_modality)
        refs = _slices_to_predict(run, refs)
        _check_model_fits(run, spec)
        _predict(run, engine, spec, refs)
        described = engine.describe()
    studies = _write_studies(run.records, spec, request.studies, request.study_top_k)
    dicom = _write_dicom(run, spec, studies) if request.dicom_out is not None else None
    seconds = time.perf_counter() - t0
    if request.report is not None:
        _write_report(run, spec, described, studies, seconds)
    return InferSummary(request.model, described, run.counts, run.records, studies, run.failures, seconds,
                        request.out, bool(spec.crop and not request.predict.uncropped),
                        0 if run.earlier is None else len(run.earlier.records), engine.stats(), dicom)


def _lock_output(stack: ExitStack, request: InferRequest) -> Resume | None:
    """One run at a time on an output; its earlier records (``resume``) checked before anything runs."""
    if request.out is None:
        return None
    from ctmask.core.outputs import output_lock

    stack.enter_context(output_lock(request.out, request.command))
    return Resume(request.out) if request.resume else None


def _slices_to_predict(run: _Run, refs: list[SliceRef]) -> list[SliceRef]:
    """The listed slices less this run's own outputs, an earlier run's overlays and (resume)
    the slices the earlier output holds; every slice given its identity."""
    from ctmask.runtime.overlays import without_overlays
    from ctmask.scans.types import with_identities

    guard = run.request.exclude
    if guard is not None:  # this run's own outputs inside an input folder (overlays, a predictions file) are no inputs
        refs = [r for r in refs if not guard.excludes(r.path)]
        run.failures = [f for f in run.failures if not guard.excludes(f.file)]
    refs, drawn = without_overlays(refs)  # an earlier run's overlays (tagged PNGs) are no slices either
    if drawn:
        run.events.warn(f"skipped {len(drawn)} overlay PNG(s) an earlier ctmask run drew (e.g. {drawn[0].path}): "
                        "overlays are no CT slices")
    refs = with_identities(refs)
    earlier = run.earlier
    if earlier is not None:
        n_before = len(refs)
        refs = [r for r in refs if not earlier.done(r)]
        torn = "; an incomplete last line (a killed run) is left out" if earlier.torn else ""
        run.events.note(f"resume: {n_before - len(refs)} slice(s) already in {run.request.out}, {len(refs)} to "
                        f"predict{torn}")
    return refs


def _check_model_fits(run: _Run, spec: GraphSpec) -> None:
    """Refuse a cropping model without crop boxes, and an earlier output another model wrote;
    warn when the model runs off its training distribution or the boxes go unused."""
    model, uncropped, boxes = run.request.model, run.options.uncropped, run.options.boxes
    check_crop(spec, boxes, uncropped)
    if spec.crop and uncropped:
        run.events.warn(f"{model} was trained on body-cropped slices; running it on whole slices (--uncropped) puts "
                        "it off its training distribution")
    elif not spec.crop and boxes is not None:
        run.events.warn(f"{model} was trained on whole slices; --boxes ignored")
    if run.earlier is not None:
        run.earlier.check(spec.class_names)


def _predict(run: _Run, engine: Engine, spec: GraphSpec, refs: list[SliceRef]) -> None:
    """Predict ``refs`` on ``engine``; every record to ``out`` as it is made (flushed after each batch)."""
    from ctmask.core.progress import progress

    out = run.request.out
    writer = (PredictionWriter(out, spec.class_names, scan_columns=True, resume=run.earlier)
              if out is not None else None)
    t_run = time.perf_counter()
    with (writer or contextlib.nullcontext()), progress(len(refs), "infer", run.events.progress) as advance:

        def batch_done(n: int) -> None:
            if writer is not None:
                writer.flush()  # the batch's records are in --out: a run killed from here resumes after it
            advance(n)

        for item in engine.predict(refs, spec, run.options, run.request.overlays, batch_done):
            if isinstance(item, Failure):
                run.failures.append(item)
            else:
                _take(run, *item, writer)
    run.infer_seconds = time.perf_counter() - t_run


def _take(run: _Run, pred: Prediction, decoded: DecodedSlice | None, writer: PredictionWriter | None) -> None:
    """One slice's prediction: its overlay drawn, its record kept and written."""
    overlays = run.request.overlays
    if overlays is not None and decoded is not None:
        from ctmask.runtime.overlays import write_overlay

        pred.overlay, reason = write_overlay(overlays, pred, decoded, run.options.top_rois)
        if reason is not None:
            run.failures.append(Failure(pred.key or pred.file, reason))
    run.counts[pred.class_name] = run.counts.get(pred.class_name, 0) + 1
    run.records.append(pred.to_dict())
    if writer is not None:
        writer.write(pred)
    if run.events.prediction is not None:
        run.events.prediction(pred)


def _write_studies(records: list[dict], spec: GraphSpec, studies: Path | None, top_k: int) -> list[dict]:
    """Aggregate the slice records into studies; write them when asked."""
    from ctmask.runtime.study import StudyWriter, aggregate

    aggregated = aggregate(records, spec.class_names, top_k)
    if studies is not None:
        with StudyWriter(studies, spec.class_names) as w:
            for s in aggregated:
                w.write(s)
    return [s.to_dict() for s in aggregated]


def _write_dicom(run: _Run, spec: GraphSpec, studies: list[dict]) -> list[dict]:
    """The DICOM result objects of every study read from DICOM (a study that cannot get them is a failure)."""
    from ctmask.runtime.dicom_out import DicomOptions, write_dicom_results

    request = run.request
    assert request.dicom_out is not None
    written, failures = write_dicom_results(run.records, studies, spec, request.model,
                                            DicomOptions(request.dicom_out, request.dicom_sc, run.options.top_rois,
                                                         run.options.read.force_modality), run.events.warn)
    run.failures.extend(failures)
    return [w.to_dict() for w in written]


def _write_report(run: _Run, spec: GraphSpec, described: dict, studies: list[dict], seconds: float) -> None:
    """The HTML report of the run (every record, the earlier run's too)."""
    from ctmask.core.fileio import output_error
    from ctmask.runtime.report import write_report

    request = run.request
    all_counts: dict[str, int] = {}
    for rec in run.records:
        all_counts[rec["class"]] = all_counts.get(rec["class"], 0) + 1
    try:
        write_report(request.report, model={"path": str(request.model), "metadata": spec.metadata(),
                                            "runner": described},
                     slices=run.records, studies=studies, skipped=[(f.file, f.reason) for f in run.failures],
                     counts=all_counts,
                     timing={"seconds": round(seconds, 3), "inference_seconds": round(run.infer_seconds, 3)},
                     command=request.command)
    except OSError as exc:
        raise output_error(exc, request.report) from None
