"""``ctmask infer --dicomweb URL --study UID [--series UID]``: a study pulled from a DICOMweb
server, predicted, its results stored back into it.

1. QIDO-RS lists the study's series (or the one asked for). A series whose modality is not CT
   is refused and named (``--force-modality`` takes it anyway), without being fetched.
2. WADO-RS streams each CT series' instances into a temporary folder, written as received, not
   decoded (:mod:`ctmask.pacs.multipart`); from there the file readers take them, with their
   size limits and refusals (a localizer, an instance too large, a broken file: refused and
   named, the rest predicted).
3. The pipeline of ``ctmask infer`` predicts them (the same records as on the files).
4. The DICOM result objects go to the spool, then by STOW-RS into the study (retried with
   backoff; what the server did not take stays in the spool for the next run).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctmask.pacs.dicomweb import DicomWeb, SeriesInfo
from ctmask.pacs.retry import Backoff
from ctmask.pacs.spool import SendReport, Spool
from ctmask.pacs.study import StudyResult, StudySettings, infer_folder
from ctmask.runtime.pipeline import InferEvents
from ctmask.runtime.runner import Runner
from ctmask.scans.types import Failure


@dataclass
class PullResult:
    """What ``infer --dicomweb`` did: the study's run, the series refused, the transfer."""

    study: str
    result: StudyResult | None
    refused: list[Failure]
    sent: SendReport

    @property
    def failures(self) -> list[Failure]:
        return self.refused + (self.result.summary.failures if self.result is not None else [])

    def to_dict(self) -> dict:
        summary = self.result.summary.to_dict() if self.result is not None else {"predicted": 0}
        summary["skipped"] = [f.to_dict() for f in self.failures]
        summary["predictions"] = self.result.summary.records if self.result is not None else []
        return {**summary, "study": self.study, "results": self.sent.to_dict()}


def split_series(series: list[SeriesInfo], force_modality: bool) -> tuple[list[SeriesInfo], list[Failure]]:
    """The series to fetch, and those refused (modality other than CT) with why."""
    take, refused = [], []
    for s in series:
        if s.modality == "CT" or force_modality:
            take.append(s)
        else:
            refused.append(Failure(s.name(), f"modality {s.modality or 'unknown'}, not CT: refused (not fetched; "
                                             "--force-modality takes it)"))
    return take, refused


def infer_dicomweb(web: DicomWeb, study: str, series: str | None, settings: StudySettings, spool_root: Path,
                   open_runner: Callable[[], AbstractContextManager[Runner]], backoff: Backoff,
                   events: InferEvents = InferEvents(), keep: Path | None = None) -> PullResult:
    """Pull ``study`` (only ``series``) from ``web``, predict its CT series, store the results
    back (see the module). ``keep``: write the records there (``predictions.jsonl``,
    ``studies.jsonl``) instead of a temporary folder."""
    spool = Spool(spool_root, web.url)
    earlier = _flush(web, spool, backoff, events) if spool.pending() else None
    found = web.series(study, series)
    take, refused = split_series(found, settings.predict.read.force_modality)
    for f in refused:
        events.warn(f"{f.file}: {f.reason}")
    result = None
    with tempfile.TemporaryDirectory(prefix="ctmask-dicomweb-") as tmp:
        if take:
            too_large: list[Failure] = []
            for s in take:
                written, over = web.fetch_series(study, s.uid, Path(tmp) / "series" / s.uid)
                too_large += over
                events.note(f"fetched {len(written)} instance(s) of {s.name()} by WADO-RS")
            name = _instance_url(web.url, study, Path(tmp) / "series")
            shown = events
            if events.prediction is not None:
                show = events.prediction
                shown = dataclasses.replace(events, prediction=lambda p: show(dataclasses.replace(
                    p, file=name(p.file, p.identity), key=name(p.key, p.identity))))
            result = infer_folder(Path(tmp) / "series", keep or Path(tmp) / "results", settings, open_runner, shown)
            _rename(result, name)
            refused += too_large
            spool.add(result.dicom)
        sent = _flush(web, spool, backoff, events)
    if earlier is not None:
        sent.sent += earlier.sent
    return PullResult(study, result, refused, sent)


def _instance_url(url: str, study: str, root: Path) -> Callable[[Any, Any], Any]:
    """(a path under the temporary folder, the slice's identity) -> the instance's WADO-RS URL
    (``#frame`` kept): the records name the instances where they are, not where they were
    briefly kept. A file without a DICOM identity (refused before it was read) is named by its
    series and its place in the WADO-RS answer."""
    prefix = str(root) + os.sep

    def name(path: Any, identity: Any = None) -> Any:
        if not isinstance(path, str) or not path.startswith(prefix):
            return path
        series, _, rest = path[len(prefix):].partition(os.sep)
        number, hash_, frame = rest.partition("#")
        base = f"{url}/studies/{study}/series/{series}"
        if isinstance(identity, str) and identity.startswith("dicom:"):
            return f"{base}/instances/{identity.removeprefix('dicom:').partition('#')[0]}{hash_}{frame}"
        return f"{base} (instance {number.removesuffix('.dcm').lstrip('0')} of the WADO-RS answer){hash_}{frame}"

    return name


def _rename(result: StudyResult, name: Callable[[Any, Any], Any]) -> None:
    """The records, the studies' driving slices and the failures named by :func:`_instance_url`."""
    summary = result.summary
    ids = {r.get("key"): r.get("id") for r in summary.records}
    for rec in summary.records:
        rec["file"], rec["key"] = name(rec.get("file"), rec.get("id")), name(rec.get("key"), rec.get("id"))
    for st in summary.studies:
        for d in st.get("driving", []):
            d["key"] = name(d.get("key"), ids.get(d.get("key")))
    summary.failures = [Failure(name(f.file, None), f.reason, f.error) for f in summary.failures]
    summary.out = None


def _flush(web: DicomWeb, spool: Spool, backoff: Backoff, events: InferEvents) -> SendReport:
    def retry(reason: str, wait: float) -> None:
        events.warn(f"{reason}: trying again in {wait:g} s")

    return spool.flush(lambda study, files: web.store(files, study), backoff, retry)
