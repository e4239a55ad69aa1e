"""One received study through ``ctmask infer``: its folder of DICOM files predicted on an open
runner (:func:`ctmask.runtime.pipeline.run_infer`, the same pipeline, readers, limits and
refusals as files on disk), its records written next to its DICOM result objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from ctmask.runtime.batch_run import PredictOptions
from ctmask.runtime.pipeline import InferEvents, InferRequest, InferSummary, LocalEngine, run_infer
from ctmask.runtime.runner import Runner


def dicom_results_supported() -> bool:
    """Whether this ctmask writes DICOM result objects (``InferRequest.dicom_out``)."""
    return any(f.name == "dicom_out" for f in dataclasses.fields(InferRequest))


@dataclass(frozen=True)
class StudySettings:
    """How every study is predicted: the model and the ``infer`` options that apply."""

    model: Path
    predict: PredictOptions = PredictOptions()
    study_top_k: int = 5
    dicom_sc: bool = False


@dataclass
class StudyResult:
    """A study's run: its summary, its records files and its DICOM result files (empty while
    this ctmask writes none)."""

    summary: InferSummary
    predictions: Path
    studies: Path
    dicom: list[Path]


def infer_folder(folder: Path, out: Path, settings: StudySettings,
                 open_runner: Callable[[], AbstractContextManager[Runner]],
                 events: InferEvents = InferEvents()) -> StudyResult:
    """Predict the DICOM files under ``folder``; write ``out/predictions.jsonl``,
    ``out/studies.jsonl`` and the DICOM result objects under ``out/dicom``."""
    out.mkdir(parents=True, exist_ok=True)
    predictions, studies, dicom_dir = out / "predictions.jsonl", out / "studies.jsonl", out / "dicom"
    for stale in (predictions, studies):
        stale.unlink(missing_ok=True)
    extra: dict = {}
    if dicom_results_supported():
        extra["dicom_out"] = dicom_dir
        if any(f.name == "dicom_sc" for f in dataclasses.fields(InferRequest)):
            extra["dicom_sc"] = settings.dicom_sc
    request = InferRequest(settings.model, [folder], predictions, studies, study_top_k=settings.study_top_k,
                           predict=settings.predict, **extra)
    summary = run_infer(request, LocalEngine(open_runner), events)
    dicom = sorted(p for p in dicom_dir.rglob("*.dcm") if p.is_file()) if dicom_dir.is_dir() else []
    return StudyResult(summary, predictions, studies, dicom)


def shared_runner(runner: Runner) -> Callable[[], AbstractContextManager[Runner]]:
    """An ``open_runner`` that hands out ``runner`` (opened once, kept open by the caller) to
    every study instead of loading the model again."""
    return lambda: contextlib.nullcontext(runner)
