"""The spool: result files waiting for their PACS, kept on disk until it has them.

Results are written to the spool before any transfer (``<root>/<destination key>/<study
UID>/<file>``, each file atomically), and a file leaves the spool only once the destination
has acknowledged it. A PACS that is down, or that answers 5xx, keeps them there: the sender
tries again with backoff (:mod:`ctmask.pacs.retry`), and a later run to the same destination
(``infer --dicomweb``, ``listen``) sends what an earlier one left. Nothing is lost, and nothing
is sent twice under two identities: the result objects carry deterministic UIDs, so a file sent
again replaces its earlier copy in the PACS.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ctmask.core.errors import ConfigError, PacsError
from ctmask.pacs.retry import Backoff, TransientError, with_retries

Sender = Callable[[str, list[Path]], int]
"""``send(study_uid, files)``: the files stored into the study (raises TransientError /
PacsError); the number stored."""


@dataclass
class SendReport:
    """What a flush of the spool did: instances ``sent`` and still ``pending`` (in ``folder``),
    and why the pending ones are."""

    destination: str
    folder: Path
    sent: int = 0
    pending: int = 0
    errors: list[str] = field(default_factory=list)
    studies: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.pending == 0

    def status(self) -> str:
        """The final status line."""
        if self.ok:
            return f"results: {self.sent} instance(s) stored in {self.destination}"
        return (f"results: {self.sent} instance(s) stored in {self.destination}, {self.pending} held in the spool "
                f"{self.folder} ({'; '.join(self.errors)}): the next run to {self.destination} sends them")

    def to_dict(self) -> dict:
        return {"destination": self.destination, "spool": str(self.folder), "sent": self.sent,
                "pending": self.pending, "errors": self.errors, "studies": self.studies}


def _study_of(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    except Exception as exc:  # pydicom raises many kinds on a bad file
        raise PacsError(f"not a DICOM result file ({type(exc).__name__}: {exc})") from None
    uid = str(ds.get("StudyInstanceUID", "") or "")
    if not uid:
        raise PacsError(f"{path}: a result without StudyInstanceUID")
    return uid


class Spool:
    """The results waiting for ``destination`` (a URL, or ``HOST:PORT:AE``) under ``root``."""

    def __init__(self, root: Path, destination: str):
        self.destination = destination
        key = hashlib.sha256(destination.encode()).hexdigest()[:16]
        for d in (Path(root), Path(root) / key):  # found now, not once the study is predicted and its results made
            if d.exists() and not d.is_dir():
                raise ConfigError("the spool is not a folder", d, hint="give --spool a folder (or remove that file)")
        self.folder = Path(root) / key
        self._lock = threading.Lock()

    def add(self, files: list[Path]) -> int:
        """Copy ``files`` (DICOM results) into the spool by study, each atomically; a file of the
        same name (the same result of an earlier run) is replaced. The number added."""
        from ctmask.core.fileio import atomic_path, write_text_atomic

        with self._lock:
            self.folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # patient data: this user's only
            self.folder.mkdir(exist_ok=True, mode=0o700)
            write_text_atomic(self.folder / "DESTINATION", self.destination + "\n")
            for f in files:
                target = self.folder / _safe(_study_of(f)) / f.name
                target.parent.mkdir(exist_ok=True)
                with atomic_path(target) as tmp:
                    shutil.copyfile(f, tmp)
        return len(files)

    def studies(self) -> dict[str, list[Path]]:
        """The pending files by study (the folder name is the study UID)."""
        if not self.folder.is_dir():
            return {}
        return {d.name: sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
                for d in sorted(self.folder.iterdir()) if d.is_dir()}

    def pending(self) -> int:
        return sum(len(files) for files in self.studies().values())

    def flush(self, send: Sender, backoff: Backoff, on_retry: Callable[[str, float], None] | None = None
              ) -> SendReport:
        """Send every pending study (retried with ``backoff`` while the failure may pass); what
        was sent leaves the spool, the rest stays. Never raises for a PACS failure: the report
        says what is pending and why."""
        report = SendReport(self.destination, self.folder)
        with self._lock:
            for study, files in self.studies().items():
                if not files:
                    continue
                try:
                    report.sent += with_retries(functools.partial(send, study, files), backoff, on_retry)
                except TransientError as exc:
                    report.pending += len(files)
                    report.errors.append(exc.message)
                    break  # the destination is down: the other studies wait for the next flush
                except PacsError as exc:
                    report.pending += len(files)
                    report.errors.append(exc.message)
                    continue
                report.studies.append(study)
                for f in files:
                    f.unlink(missing_ok=True)
                if not any(self.folder.joinpath(study).iterdir()):
                    self.folder.joinpath(study).rmdir()
            report.pending = self.pending()
        return report


def _safe(uid: str) -> str:
    return "".join(c if c.isdigit() or c == "." else "_" for c in uid)[:128]
