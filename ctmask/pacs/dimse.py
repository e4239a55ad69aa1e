"""DIMSE with pynetdicom (the maintained pure-Python DICOM networking library): C-STORE of result
files to a destination (SCU), and a storage SCP that writes what it receives to disk.

A destination is ``HOST:PORT:AE``. An association the destination refuses, aborts or never
answers is a :class:`~ctmask.pacs.retry.TransientError` (retried by the caller); an instance it
answers with a failure status is a :class:`~ctmask.core.errors.PacsError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctmask.core.errors import ConfigError, PacsError
from ctmask.pacs import is_uid
from ctmask.pacs.retry import TransientError

_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 characters of the default repertoire, no backslash


def check_ae(title: str, what: str = "AE title") -> str:
    """``title`` when it is a valid AE title (1 to 16 characters, no backslash / control)."""
    if not _AE.match(title) or not title.strip():
        raise ConfigError(f"{what} {title!r}: want 1 to 16 printable characters (no backslash)")
    return title.strip()


@dataclass(frozen=True)
class Destination:
    """A DIMSE peer: ``host``, ``port`` and its AE title."""

    host: str
    port: int
    ae: str

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``HOST:PORT:AE`` (an IPv6 host in brackets: ``[::1]:104:PACS``)."""
        m = re.match(r"^(\[[^\]]+\]|[^:]+):(\d{1,5}):(.+)$", text)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ConfigError(f"--dest {text!r}: want HOST:PORT:AE, e.g. 127.0.0.1:4242:ORTHANC")
        return cls(m.group(1).strip("[]"), int(m.group(2)), check_ae(m.group(3), "--dest AE title"))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.ae}"


def c_store(files: Sequence[Path], dest: Destination, calling_ae: str = "CTMASK", timeout: float = 30.0) -> int:
    """C-STORE every file to ``dest`` over one association; the number stored.

    Raises:
        TransientError: the association refused, aborted or unanswered.
        PacsError: an instance answered with a failure status, or a file that is no DICOM.
    """
    import pydicom
    from pynetdicom import AE

    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except Exception as exc:  # pydicom raises many kinds on a bad file
            raise PacsError(f"not a DICOM file ({type(exc).__name__}: {exc})", f) from None
    if not datasets:
        return 0
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    for sop_class, syntax in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae)
    if not assoc.is_established:
        why = "refused" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not answered"
        raise TransientError(f"C-STORE to {dest}: association {why}")
    stored = 0
    try:
        for f, ds in zip(files, datasets, strict=True):
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # no accepted presentation context, association gone
                raise PacsError(f"C-STORE to {dest}: {f.name} not sent ({exc})") from None
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                raise TransientError(f"C-STORE to {dest}: no answer for {f.name} (association lost)")
            if code != 0 and (code >> 12) != 0xB:  # 0x0000 success, 0xBxxx warning (stored)
                raise PacsError(f"C-STORE to {dest}: {f.name} refused (status 0x{code:04X})")
            stored += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


class StorageSCP:
    """A storage SCP on ``host:port`` as ``ae``: every instance it receives is written by
    ``store(study_uid, sop_uid, encoded)`` (the encoded file with its meta header, not decoded).

    ``allow``: the calling AE titles accepted (others refused at association); empty: any.
    """

    def __init__(self, ae: str, host: str, port: int, allow: Sequence[str],
                 store: Callable[[str, str, bytes], None], max_instance_bytes: int | None = None):
        from ctmask.pacs.multipart import MAX_INSTANCE_BYTES

        self.ae_title, self.host, self.port = check_ae(ae, "--ae"), host, port
        self.allow = [check_ae(a, "--allow") for a in allow]
        self._store = store
        self._server: Any = None
        self.max_instance_bytes = MAX_INSTANCE_BYTES if max_instance_bytes is None else max_instance_bytes
        self._received: dict[int, int] = {}  # bytes received by association since its last instance

    def _on_data(self, event: Any) -> None:
        """pynetdicom holds an instance whole in memory as it comes: an association whose instance
        passes ``max_instance_bytes`` is aborted before it is held whole."""
        key = id(event.assoc)
        self._received[key] = self._received.get(key, 0) + len(event.data)
        if self._received[key] > self.max_instance_bytes:
            self._received.pop(key, None)
            event.assoc.abort()

    def _on_close(self, event: Any) -> None:
        self._received.pop(id(event.assoc), None)

    def start(self) -> None:
        """Listen (in background threads) until :meth:`stop`."""
        from pydicom.uid import DeflatedExplicitVRLittleEndian
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        # every transfer syntax but Deflated: pydicom inflates a deflated data set whole, outside the
        # readers' limits (a sender then sends it uncompressed, or its compressed pixels)
        syntaxes = [ts for ts in ALL_TRANSFER_SYNTAXES if ts != DeflatedExplicitVRLittleEndian]
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, syntaxes)
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        try:
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                         (evt.EVT_DATA_RECV, self._on_data),
                                                         (evt.EVT_ABORTED, self._on_close),
                                                         (evt.EVT_RELEASED, self._on_close),
                                                         (evt.EVT_CONN_CLOSE, self._on_close)])
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc})",
                              hint="choose another --port / --host") from None

    def _on_store(self, event: Any) -> int:
        self._received[id(event.assoc)] = 0  # the next instance counts from here
        ds = event.dataset  # the elements are parsed on access: two UIDs here, the pixels never
        study, sop = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
        if not is_uid(study) or not is_uid(sop):  # missing, or no UID ("..", a slash): they name files
            return 0xA900  # dataset does not match SOP class
        try:
            self._store(study, sop, event.encoded_dataset())
        except OSError:
            return 0xA700  # out of resources
        return 0x0000

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def is_loopback(host: str) -> bool:
    """``host`` is this machine only (127.0.0.0/8, ::1, ``localhost``)."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.strip().lower() == "localhost"


def exposure_warning(host: str, allow: Sequence[str]) -> str | None:
    """The warning for an SCP reachable beyond this machine that takes any calling AE, else None."""
    if allow or is_loopback(host):
        return None
    return (f"--host {host} takes studies from BEYOND THIS MACHINE and from ANY calling AE title: name the senders "
            "with --allow AE (docs/pacs.md: Exposure)")
