"""DICOMweb: the series of a study (QIDO-RS), their instances (WADO-RS), results stored back
(STOW-RS). QIDO and STOW go through ``dicomweb-client`` (the DICOMweb client of the highdicom /
IDC authors, maintained); WADO-RS is a plain streamed GET whose multipart answer is split to disk
here (:mod:`ctmask.pacs.multipart`: dicomweb-client would hold and parse each instance whole,
outside the readers' limits).

Every request goes through :func:`call` so that its failures are sorted in one place: the PACS
unreachable, a timeout, an HTTP 5xx / 429 answer are :class:`~ctmask.pacs.retry.TransientError`
(retried by the caller's backoff); any other answer is a :class:`~ctmask.core.errors.PacsError`.
dicomweb-client's own retries are turned off: one backoff policy, ours, governs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from ctmask.core.errors import PacsError
from ctmask.pacs import is_uid
from ctmask.pacs.retry import RETRIED_HTTP, Backoff, TransientError, with_retries
from ctmask.scans.types import Failure

if TYPE_CHECKING:
    import requests
    from dicomweb_client.api import DICOMwebClient

T = TypeVar("T")

# QIDO attribute tags: (0008,0060) Modality, (0020,000E) SeriesInstanceUID, (0008,103E) SeriesDescription,
# (0020,0011) SeriesNumber, (0020,1209) NumberOfSeriesRelatedInstances.
_MODALITY, _SERIES_UID, _DESCRIPTION, _NUMBER, _COUNT = "00080060", "0020000E", "0008103E", "00200011", "00201209"


@dataclass(frozen=True)
class SeriesInfo:
    """One series as QIDO-RS describes it."""

    uid: str
    modality: str
    description: str = ""
    number: str = ""
    instances: int | None = None

    def name(self) -> str:
        """How a message names the series: its number and description, and its UID."""
        label = " ".join(x for x in (f"#{self.number}" if self.number else "", self.description) if x)
        return f"series {label + ' ' if label else ''}({self.uid})"


def call(what: str, url: str, fn: Callable[[], T]) -> T:
    """``fn()`` (a dicomweb-client request), its failures as :class:`TransientError` (worth a
    retry) or :class:`PacsError` naming ``what`` and ``url``."""
    import requests

    try:
        return fn()
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        message = f"{what}: {url} answered HTTP {status}"
        if status in (401, 403):
            raise PacsError(message + " (credentials refused)",
                            hint="set CTMASK_PACS_USER / CTMASK_PACS_PASSWORD, CTMASK_PACS_TOKEN or --credentials "
                                 "FILE") from None
        if status in RETRIED_HTTP:
            raise TransientError(message) from None
        raise PacsError(message) from None
    except requests.exceptions.SSLError as exc:
        raise PacsError(f"{what}: {url}: TLS certificate not verified ({exc})",
                        hint="give the PACS's CA with --ca-bundle FILE") from None
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        raise TransientError(f"{what}: {url} unreachable ({type(exc).__name__})") from None
    except requests.RequestException as exc:  # a redirect loop, a bad Content-Encoding, a bad URL: the server's
        raise PacsError(f"{what}: {url}: {type(exc).__name__} (the server's answer is unusable)") from None


class DicomWeb:
    """A DICOMweb server at ``url`` (its QIDO / WADO / STOW root, e.g.
    ``http://host:8042/dicom-web``), reached through ``session`` (credentials, TLS)."""

    def __init__(self, url: str, session: requests.Session, backoff: Backoff = Backoff(),
                 on_retry: Callable[[str, float], None] | None = None, timeout: float = 60.0):
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        self.backoff = backoff
        self.on_retry = on_retry
        self.session, self.timeout = session, timeout
        self.client: DICOMwebClient = DICOMwebClient(self.url, session=session, timeout=timeout)
        self.client.set_http_retry_params(retry=False)

    def _retried(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(lambda: call(what, self.url, fn), self.backoff, self.on_retry)

    def series(self, study: str, series: str | None = None) -> list[SeriesInfo]:
        """The series of ``study`` (only ``series`` when given), by QIDO-RS.

        Raises:
            PacsError: the study (or series) is not on the server.
        """
        filters = {"SeriesInstanceUID": series} if series else None
        fields = ["Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
        found = self._retried("QIDO-RS series", lambda: self.client.search_for_series(
            study, fields=fields, search_filters=filters, get_remaining=True))
        out = [SeriesInfo(_value(s, _SERIES_UID), _value(s, _MODALITY).upper(), _value(s, _DESCRIPTION),
                          _value(s, _NUMBER), _count(s)) for s in found]
        for s in out:  # the UID names a folder and a URL: "../.." from a hostile server must not
            if not is_uid(s.uid):
                raise PacsError(f"{self.url}: QIDO-RS answered a SeriesInstanceUID that is no UID: {s.uid[:80]!r}")
        if not out:
            what = f"series {series} of study {study}" if series else f"study {study}"
            raise PacsError(f"{self.url}: no {what} (QIDO-RS found none)")
        return out

    def fetch_series(self, study: str, series: str, folder: Path) -> tuple[list[Path], list[Failure]]:
        """Every instance of ``series`` by WADO-RS into ``folder`` (``000001.dcm`` ... in the
        answer's order), streamed to disk as received, not decoded
        (:mod:`ctmask.pacs.multipart`); the paths written, and the instances refused (over
        :data:`~ctmask.pacs.multipart.MAX_INSTANCE_BYTES`)."""
        from ctmask.core.errors import TooLargeError
        from ctmask.pacs.multipart import boundary_of, split_parts

        for uid in (study, series):
            if not is_uid(uid):
                raise PacsError(f"not a DICOM UID: {uid[:80]!r}")
        url = f"{self.url}/studies/{study}/series/{series}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'

        def open_part(n: int) -> tuple[Path, BinaryIO]:
            path = folder / f"{n:06d}.dcm"
            return path, open(path, "wb")

        def fetch() -> tuple[list[Path], list[tuple[int, str]]]:
            shutil.rmtree(folder, ignore_errors=True)  # what an earlier, broken try left
            folder.mkdir(parents=True)
            with self.session.get(url, headers={"Accept": accept}, stream=True, timeout=self.timeout) as r:
                r.raise_for_status()
                return split_parts(r.iter_content(1 << 20), boundary_of(r.headers.get("Content-Type", "")),
                                   open_part)

        written, refused = self._retried(f"WADO-RS series {series}", fetch)
        return written, [Failure(f"{url} (instance {n} of the answer)", why, TooLargeError) for n, why in refused]

    def store(self, files: Iterable[Path], study: str) -> int:
        """STOW-RS the DICOM ``files`` into ``study``; the number stored.

        Raises:
            PacsError: a file that is no DICOM, a study UID that differs, or the server's refusal
                of an instance (its failed SOP sequence).
        """
        import pydicom

        datasets = []
        for p in files:
            try:
                datasets.append(pydicom.dcmread(p))
            except Exception as exc:  # pydicom raises many kinds on a bad file (a corrupt spool file)
                raise PacsError(f"not a DICOM file ({type(exc).__name__}: {exc})", p) from None
        for p, ds in zip(files, datasets, strict=True):
            if str(ds.get("StudyInstanceUID", "")) != study:
                raise PacsError(f"{p}: belongs to study {ds.get('StudyInstanceUID')}, not {study}")
        if not datasets:
            return 0
        # no retries here: the spool that calls this retries the whole study with its backoff
        answer = call(f"STOW-RS study {study}", self.url, lambda: self.client.store_instances(datasets, study))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = [f"{i.get('ReferencedSOPInstanceUID', '?')} (reason {i.get('FailureReason', '?')})"
                       for i in failed]
            raise PacsError(f"STOW-RS study {study}: {self.url} refused {len(failed)} instance(s): "
                            + ", ".join(reasons))
        return len(datasets)

    def instances(self, study: str, series: str | None = None) -> list[str]:
        """The SOP Instance UIDs of ``study`` (of ``series``) by QIDO-RS."""
        found = self._retried("QIDO-RS instances", lambda: self.client.search_for_instances(
            study, series, get_remaining=True))
        return [_value(i, "00080018") for i in found]


def _value(obj: dict, tag: str) -> str:
    values = obj.get(tag, {}).get("Value") or [""]
    v = values[0]
    return str(v.get("Alphabetic", "") if isinstance(v, dict) else v)


def _count(obj: dict) -> int | None:
    v = _value(obj, _COUNT)
    return int(v) if v.isdigit() else None


