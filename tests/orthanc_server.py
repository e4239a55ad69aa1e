"""A real PACS for the tests: Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``, installed
by ``make test`` where apt-get and root are available), started in the foreground with its own JSON
configuration on free loopback ports, a temporary storage folder and the DICOMweb plugin, stopped by
its PID. :func:`orthanc_missing` says why the tests that need it skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
USER, PASSWORD = "ctmask-test", "orthanc-test-password"


def _binary() -> str | None:
    return shutil.which("Orthanc")


def _dicomweb_plugin() -> Path | None:
    for d in PLUGIN_DIRS:
        for p in sorted(d.glob("libOrthancDicomWeb.so*")) if d.is_dir() else []:
            return p
    return None


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if _binary() is None:
        return "needs Orthanc (Debian: apt-get install orthanc orthanc-dicomweb; `make test` does it as root)"
    if _dicomweb_plugin() is None:
        return "needs Orthanc's DICOMweb plugin (Debian: apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc under ``root`` (storage, configuration, log); ``modalities``: the DICOM peers it
    may send to, name -> (AE, port) on loopback. HTTP basic authentication is on
    (:data:`USER` / :data:`PASSWORD`), instances stored again replace the earlier copy."""

    AE = "ORTHANC"

    def __init__(self, root: Path, modalities: dict[str, tuple[str, int]] | None = None):
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.config = root / "orthanc.json"
        (root / "db").mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps({
            "Name": "ctmask-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.AE,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(_dicomweb_plugin())], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "OverwriteInstances": True, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: [ae, "127.0.0.1", port] for name, (ae, port) in (modalities or {}).items()},
            "StableAge": 1, "ConcurrentJobs": 1, "HttpThreadsCount": 8,
        }))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Orthanc:
        log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen([str(_binary()), str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.root)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}): "
                                   f"{(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if self.get("/system").get("DicomPort") == self.dicom_port and self._dicom_open():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s")

    def _dicom_open(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to its PID, then wait (SIGKILL after 20 s)."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def get(self, path: str) -> dict | list:
        r = requests.get(self.url + path, auth=(USER, PASSWORD), timeout=10)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: object) -> dict | list:
        """POST ``body`` (a string as is, anything else as JSON)."""
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        r = requests.post(self.url + path, auth=(USER, PASSWORD), data=data, timeout=120)
        r.raise_for_status()
        return r.json()
