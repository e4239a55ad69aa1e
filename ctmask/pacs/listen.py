"""``ctmask listen``: a DIMSE storage SCP that predicts the studies it receives and C-STOREs the
results to a destination.

* Each instance received is written as it comes (``<work>/incoming/<study UID>/<SOP UID>.dcm``,
  atomically, not decoded).
* A study is complete when no instance of it has come for ``idle`` seconds: its folder is moved
  aside and predicted by the ``ctmask infer`` pipeline on the runner opened once at start (the
  same readers, limits and refusals as files: a localizer or an MR image in the study is
  refused and named, the CT series predicted); its records go to ``<work>/results/<study UID>/``.
  Instances of the study that come later make a new folder, predicted when it in turn is idle
  (its results replace the earlier ones: deterministic UIDs).
* The DICOM result objects go to the spool (``<work>/spool``), then by C-STORE to the
  destination; a destination that is down is tried again with backoff (doubling waits) for as
  long as the listener runs, and what it has not taken when the listener stops stays in the
  spool, sent first by the next ``listen`` to the same destination.
* Calling AE titles outside ``allow`` are refused at association; the SCP listens on loopback
  unless told otherwise.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ctmask.core.errors import CtmaskError
from ctmask.pacs.dimse import Destination, StorageSCP, c_store
from ctmask.pacs.retry import Backoff
from ctmask.pacs.spool import SendReport, Spool
from ctmask.pacs.study import StudySettings, infer_folder, shared_runner
from ctmask.runtime.pipeline import InferEvents
from ctmask.runtime.runner import Runner


@dataclass(frozen=True)
class ListenOptions:
    """The ``ctmask listen`` flags."""

    dest: Destination
    work: Path
    ae: str = "CTMASK"
    host: str = "127.0.0.1"
    port: int = 11112
    allow: tuple[str, ...] = ()
    idle: float = 10.0
    backoff: Backoff = Backoff(first=1.0, longest=60.0)


@dataclass
class StudyLog:
    """One received study: when its first and last instance came, when it was predicted and when
    its results were stored (``time.time()``), and what the run found."""

    study: str
    instances: int = 0
    first_received: float = 0.0
    last_received: float = 0.0
    predicted: float | None = None
    stored: float | None = None
    results: int = 0
    summary: dict = field(default_factory=dict)
    error: str | None = None


class Listener:
    """A running ``ctmask listen`` (see the module): :meth:`start`, then :meth:`stop`."""

    def __init__(self, options: ListenOptions, settings: StudySettings,
                 open_runner: Callable[[], AbstractContextManager[Runner]], events: InferEvents = InferEvents()):
        self.options, self.settings, self.events = options, settings, events
        self._open_runner = open_runner
        self.spool = Spool(options.work / "spool", str(options.dest))
        self.incoming = options.work / "incoming"
        self.log: dict[str, StudyLog] = {}
        self.done: list[StudyLog] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake_sender = threading.Event()
        self._stack = ExitStack()
        self._threads: list[threading.Thread] = []
        self._scp = StorageSCP(options.ae, options.host, options.port, options.allow, self._store)
        self._batch = 0

    def start(self) -> None:
        """Open the runner, send what an earlier run left in the spool, listen."""
        runner = self._stack.enter_context(self._open_runner())
        self._runner = shared_runner(runner)
        self.options.work.mkdir(parents=True, exist_ok=True, mode=0o700)  # patient data: this user's only
        self.incoming.mkdir(exist_ok=True)
        self._scp.start()
        self._stack.callback(self._scp.stop)
        for target in (self._watch, self._send):
            t = threading.Thread(target=target, name=f"ctmask-listen-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, finish: bool = True) -> SendReport:
        """Stop listening; with ``finish``, predict the studies still incoming (idle or not);
        one last send. The final transfer report (what stays in the spool, and why)."""
        self._scp.stop()
        self._stopping.set()
        self._wake_sender.set()
        for t in self._threads:
            t.join()
        if finish:
            for study in list(self.log):
                self._process(study)
        report = self.spool.flush(self._send_study, Backoff(total=0))
        self._mark_stored(report)
        self._stack.close()
        return report

    def wait_for(self, studies: int, timeout: float) -> bool:
        """Wait until ``studies`` studies are finished: their results stored, or found
        unpredictable (``error``); False after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if sum(1 for s in self.done if s.stored is not None or s.error is not None) >= studies:
                    return True
            time.sleep(0.05)
        return False

    # receiving
    def _store(self, study: str, sop: str, encoded: bytes) -> None:
        from ctmask.core.fileio import write_bytes_atomic

        with self._lock:
            now = time.time()
            log = self.log.setdefault(study, StudyLog(study, first_received=now))
            path = self.incoming / _safe(study) / f"{_safe(sop)}.dcm"
            again = path.exists()  # the same instance sent twice: replaced, counted once
            write_bytes_atomic(path, encoded)
            log.instances += 0 if again else 1
            log.last_received = now

    def _watch(self) -> None:
        tick = min(max(self.options.idle / 4, 0.05), 1.0)
        while not self._stopping.wait(tick):
            now = time.time()
            with self._lock:
                ready = [s for s, log in self.log.items() if now - log.last_received >= self.options.idle]
            for study in ready:
                try:
                    self._process(study)
                except Exception as exc:  # a bug or the machine (disk full): say so, keep listening
                    self.events.warn(f"study {study}: not predicted ({type(exc).__name__}: {exc})")

    def _process(self, study: str) -> None:
        """Predict a complete study: its folder moved aside (later instances start a new one),
        predicted, its results to the spool."""
        with self._lock:
            log = self.log.pop(study, None)
            if log is None:
                return
            self._batch += 1
            folder = self.options.work / "received" / f"{_safe(study)}.{self._batch}"
            folder.parent.mkdir(parents=True, exist_ok=True)
            (self.incoming / _safe(study)).rename(folder)
        try:
            result = infer_folder(folder, self.options.work / "results" / _safe(study), self.settings, self._runner,
                                  self.events)
            log.predicted = time.time()
            log.summary = {"predicted": result.summary.predicted, "studies": result.summary.studies,
                           "skipped": [f.to_dict() for f in result.summary.failures]}
            log.results = self.spool.add(result.dicom)
            shutil.rmtree(folder, ignore_errors=True)
        except CtmaskError as exc:  # nothing in the study could be predicted: say so, keep listening
            log.error = str(exc)
            self.events.warn(f"study {study}: {exc} (its instances are kept in {folder})")
        except Exception as exc:  # a bug or the machine (disk full): the study failed, not lost from the count
            log.error = f"not predicted ({type(exc).__name__}: {exc})"
            self.events.warn(f"study {study}: {log.error} (its instances are kept in {folder})")
        with self._lock:
            self.done.append(log)
        if log.error is None:
            self.events.note(f"study {study}: {log.instances} instance(s) received, {log.summary['predicted']} "
                             f"slice(s) predicted, {len(log.summary['skipped'])} refused, {log.results} result "
                             f"object(s) to {self.options.dest}")
        if log.results == 0 and log.error is None:
            log.stored = time.time()  # nothing to send
        self._wake_sender.set()

    # sending
    def _send_study(self, study: str, files: list[Path]) -> int:
        return c_store(files, self.options.dest, self.options.ae)

    def _send(self) -> None:
        """Flush the spool when results come, and while some are pending, with doubling waits."""
        backoff = self.options.backoff
        wait = backoff.first
        while not self._stopping.is_set():
            try:
                report = self.spool.flush(self._send_study, Backoff(total=0))
            except Exception as exc:  # not a PACS answer (a bug, the disk): keep the results, try later
                report = SendReport(str(self.options.dest), self.spool.folder, pending=self.spool.pending(),
                                    errors=[f"{type(exc).__name__}: {exc}"])
            self._mark_stored(report)
            if report.pending:
                self.events.warn(f"{'; '.join(report.errors)}: {report.pending} result(s) held in the spool, "
                                 f"trying again in {wait:g} s")
                self._wake_sender.wait(wait)
                wait = min(wait * 2, backoff.longest)
            else:
                wait = backoff.first
                self._wake_sender.wait()
            self._wake_sender.clear()

    def _mark_stored(self, report: SendReport) -> None:
        now = time.time()
        with self._lock:
            for log in self.done:
                if log.stored is None and _safe(log.study) in report.studies:
                    log.stored = now
                    self.events.note(f"study {log.study}: results stored in {self.options.dest}")


def _safe(uid: str) -> str:
    return "".join(c if c.isdigit() or c == "." else "_" for c in uid)[:128]
