"""PACS connectivity on a real PACS: Orthanc (tests/orthanc_server.py) started for this module.

``infer --dicomweb`` and ``listen`` against the same files predicted by ``ctmask infer``; series
that are not CT and localizers refused and named; the spool across an Orthanc stopped and
restarted (nothing lost, nothing doubled); an AE outside the allow list refused; credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from orthanc_server import PASSWORD, USER, Orthanc, free_port, orthanc_missing
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from ctmask.core.errors import ConfigError, PacsError
from ctmask.pacs.auth import Credentials, http_session, read_credentials
from ctmask.pacs.dicomweb import DicomWeb
from ctmask.pacs.dimse import Destination, c_store
from ctmask.pacs.retry import Backoff, TransientError, with_retries
from ctmask.pacs.spool import Spool
from ctmask.pacs.study import dicom_results_supported

needs_orthanc = pytest.mark.skipif(orthanc_missing() is not None, reason=orthanc_missing() or "")
ENV = {"CTMASK_PACS_USER": USER, "CTMASK_PACS_PASSWORD": PASSWORD}


def _cli(*args, env=None):
    from ctmask.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


# --- without a PACS ---------------------------------------------------------------------------

def test_credentials_come_from_the_environment_or_a_private_file(tmp_path):
    assert read_credentials({"CTMASK_PACS_TOKEN": "t0k"}, None) == Credentials(token="t0k")
    assert read_credentials({}, None).kind == "none"
    f = tmp_path / "pacs.json"
    f.write_text(json.dumps({"username": "u", "password": "p"}))
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        read_credentials({}, f)
    os.chmod(f, 0o600)
    creds = read_credentials({}, f)
    assert creds == Credentials("u", "p") and "p" not in repr(creds)
    with pytest.raises(ConfigError, match="both the environment"):
        read_credentials({"CTMASK_PACS_TOKEN": "t"}, f)
    with pytest.raises(ConfigError, match="without a password"):
        read_credentials({"CTMASK_PACS_USER": "u"}, None)
    f.write_text("user:password")
    with pytest.raises(ConfigError, match="not a credentials file"):
        read_credentials({}, f)
    assert http_session(Credentials(token="t")).headers["Authorization"] == "Bearer t"
    assert http_session(Credentials()).verify is True  # TLS verified unless a CA bundle is given
    with pytest.raises(ConfigError, match="no such CA bundle"):
        http_session(Credentials(), tmp_path / "missing.pem")


def test_backoff_doubles_and_gives_up_with_the_last_reason():
    assert Backoff(first=1, longest=4, total=20).waits() == [1, 2, 4, 4, 4, 4]
    tries, slept = [], []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise TransientError(f"down {len(tries)}")
        return "ok"

    assert with_retries(flaky, Backoff(first=0.5, total=10), sleep=slept.append) == "ok"
    assert slept == [0.5, 1.0]
    with pytest.raises(TransientError, match="down 2"):
        tries.clear()
        with_retries(flaky, Backoff(first=0.5, total=0.5), sleep=slept.append)


def test_destination_and_dicomweb_options_are_checked(tmp_path):
    from ctmask.pacs.dimse import exposure_warning

    assert exposure_warning("127.0.0.1", ()) is None and exposure_warning("0.0.0.0", ("PACS",)) is None
    assert "ANY calling AE title" in (exposure_warning("0.0.0.0", ()) or "")
    assert Destination.parse("[::1]:104:PACS") == Destination("::1", 104, "PACS")
    for bad in ("pacs:104", "pacs:0:AE", "pacs:104:A\\B", "pacs:104:" + "A" * 17):
        with pytest.raises(ConfigError):
            Destination.parse(bad)
    r = _cli("infer", tmp_path / "m.onnx", "--dicomweb", "http://127.0.0.1:9/dicom-web")
    assert r.exit_code == 2 and "--study" in r.output
    r = _cli("infer", tmp_path / "m.onnx", tmp_path, "--dicomweb", "http://x/dicom-web", "--study", "1.2")
    assert r.exit_code == 2 and "give no INPUTS" in r.output
    r = _cli("infer", tmp_path / "m.onnx", "--dicomweb", "http://x/dicom-web", "--study", "1.2", "--out", "a.jsonl")
    assert r.exit_code == 2 and "--out: not with --dicomweb" in r.output
    down = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    r = _cli("infer", tmp_path / "m.onnx", "--dicomweb", down, "--study", "1.2", "--retry-for", "0", env={})
    assert r.exit_code == 2 and f"QIDO-RS series: {down} unreachable" in r.output


# --- on Orthanc -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_files(tmp_path_factory):
    """Two synthetic patients of 4 slices; patient 0's study also holds an MR series and a
    localizer series (one instance each, made from its first slice)."""
    from ctmask.data.synth_dicom import synthesize_dicom

    root = tmp_path_factory.mktemp("pacs-synth")
    synthesize_dicom(root, patients=2, slices_per_patient=4, seed=5, workers=1)
    patients = json.loads((root / "manifest.json").read_text())["patients"]
    extra = root / "extra"
    extra.mkdir()
    first = sorted((root / patients[0]["series_folder"]).iterdir())[0]
    for name, change in (("mr", {"Modality": "MR"}), ("scout", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})):
        ds = pydicom.dcmread(first)
        for k, v in change.items():
            setattr(ds, k, v)
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["test_pacs", name, "series"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["test_pacs", name])
        ds.SeriesDescription, ds.SeriesNumber = name.upper(), 90 + len(name)
        ds.save_as(extra / f"{name}.dcm")
    return root, patients, extra


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc, allowed to send to a listener on ``listen_port`` (AE CTMASK)."""
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    listen_port = free_port()
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), {"ctmask": ("CTMASK", listen_port)}).start()
    server.listen_port = listen_port
    yield server
    server.stop()


def _web(pacs) -> DicomWeb:
    return DicomWeb(pacs.dicomweb, http_session(Credentials(USER, PASSWORD)), Backoff(total=0))


def _file_records(model, folder) -> dict[str, dict]:
    r = _cli("infer", model, folder, "--json", "-", "-q")
    assert r.exit_code in (0, 1), r.output
    out = json.loads(r.stdout[r.stdout.index("{\n"):])
    return {p["id"]: p for p in out["predictions"]}


def _same_calls(records: list[dict], expected: dict[str, dict]) -> None:
    got = {p["id"]: p for p in records}
    assert sorted(got) == sorted(expected)
    for k, p in got.items():
        assert p["class"] == expected[k]["class"] and p["probs"] == pytest.approx(expected[k]["probs"], abs=1e-6)


def _results(study: str, tag: str, files: list[Path], out: Path) -> list[Path]:
    """Result-like objects of ``study``: a copy of ``files`` in a new series, with UIDs derived
    from (``tag``, source instance) as the result objects' are (a rerun makes the same UIDs)."""
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid(entropy_srcs=[tag, study])
    made = []
    for f in files:
        ds = pydicom.dcmread(f)
        assert str(ds.StudyInstanceUID) == study
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series, 999, "CTMASK RESULT"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[tag, str(ds.SOPInstanceUID)])
        made.append(out / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(made[-1])
    return made


@needs_orthanc
def test_infer_dicomweb_predicts_the_ct_series_as_files_and_refuses_the_others(pacs, study_files, small_onnx,
                                                                               tmp_path):
    root, patients, extra = study_files
    p = patients[0]
    ct = sorted((root / p["series_folder"]).iterdir())
    assert _web(pacs).store([*ct, *sorted(extra.iterdir())], p["StudyInstanceUID"]) == len(ct) + 2  # STOW-RS
    args = ("infer", small_onnx, "--dicomweb", pacs.dicomweb, "--study", p["StudyInstanceUID"], "--spool",
            tmp_path / "spool", "--json", tmp_path / "run.json", "-q")
    bad = _cli(*args, env={"CTMASK_PACS_USER": USER, "CTMASK_PACS_PASSWORD": "wrong"})
    assert bad.exit_code == 2 and "HTTP 401 (credentials refused)" in bad.output
    r = _cli(*args, env=ENV)
    assert r.exit_code == 1, r.output  # the MR series and the localizer refused
    run = json.loads((tmp_path / "run.json").read_text())
    skipped = {s["file"]: s["error"] for s in run["skipped"]}
    assert any("series #92 MR" in k and "modality MR, not CT" in v for k, v in skipped.items()), skipped
    assert any("localizer" in v for v in skipped.values()), skipped
    _same_calls(run["predictions"], _file_records(small_onnx, root / p["series_folder"]))
    assert run["results"]["pending"] == 0 and "stored in " + pacs.dicomweb in r.output
    if dicom_results_supported():  # the result objects (SR, GSPS) are in the study, once each after a second run
        assert run["results"]["sent"] > 0
        assert {"SR", "PR"} <= {s.modality for s in _web(pacs).series(p["StudyInstanceUID"])}  # found by QIDO
        before = len(_web(pacs).instances(p["StudyInstanceUID"]))
        assert _cli(*args, env=ENV).exit_code == 1
        assert len(_web(pacs).instances(p["StudyInstanceUID"])) == before


@needs_orthanc
def test_spool_keeps_results_while_orthanc_is_down_and_replaces_on_resend(pacs, study_files, tmp_path):
    root, patients, _ = study_files
    p = patients[1]
    study, ct = p["StudyInstanceUID"], sorted((root / p["series_folder"]).iterdir())
    results = _results(study, "stow", ct, tmp_path / "results")
    web = _web(pacs)
    spool = Spool(tmp_path / "spool", web.url)
    spool.add(results)
    pacs.stop()
    try:
        down = spool.flush(lambda s, f: web.store(f, s), Backoff(total=0))
        assert (down.sent, down.pending) == (0, len(results)) and "unreachable" in down.status()
        assert "held in the spool" in down.status() and spool.pending() == len(results)
    finally:
        pacs.start()
    up = spool.flush(lambda s, f: web.store(f, s), Backoff(first=0.2, total=5))
    assert (up.sent, up.pending, up.studies) == (len(results), 0, [study]) and spool.pending() == 0
    series = str(pydicom.dcmread(results[0]).SeriesInstanceUID)
    assert len(web.instances(study, series)) == len(results)
    spool.add(results)  # the same results again (a rerun): replaced, not doubled
    assert spool.flush(lambda s, f: web.store(f, s), Backoff(total=0)).sent == len(results)
    assert len(web.instances(study, series)) == len(results)
    by_dimse = _results(study, "dimse", ct, tmp_path / "dimse")  # the same by C-STORE, twice
    dest = Destination("127.0.0.1", pacs.dicom_port, Orthanc.AE)
    assert c_store(by_dimse, dest) == c_store(by_dimse, dest) == len(by_dimse)
    assert len(web.instances(study, str(pydicom.dcmread(by_dimse[0]).SeriesInstanceUID))) == len(by_dimse)


def _listener(pacs, model, work: Path, idle: float = 0.3):
    from ctmask.backends.registry import make_runner
    from ctmask.pacs.listen import Listener, ListenOptions
    from ctmask.pacs.study import StudySettings

    options = ListenOptions(Destination("127.0.0.1", pacs.dicom_port, Orthanc.AE), work, "CTMASK", "127.0.0.1",
                            pacs.listen_port, ("ORTHANC",), idle, Backoff(first=0.2, longest=1.0))
    listener = Listener(options, StudySettings(model), lambda: make_runner(model, "auto", "cpu", None))
    listener.start()
    return listener


@needs_orthanc
def test_listen_predicts_a_study_orthanc_sends_as_files_and_refuses_other_aes(pacs, study_files, small_onnx,
                                                                              tmp_path):
    root, patients, extra = study_files
    p = patients[1]
    ct = sorted((root / p["series_folder"]).iterdir())
    c_store(ct, Destination("127.0.0.1", pacs.dicom_port, Orthanc.AE), "UPLOADER")  # the study into Orthanc
    listener = _listener(pacs, small_onnx, tmp_path / "work")
    try:
        with pytest.raises(TransientError, match="association refused"):  # not in --allow
            c_store(ct[:1], Destination("127.0.0.1", pacs.listen_port, "CTMASK"), "STRANGER")
        assert listener.log == {} and listener.done == []
        found = pacs.post("/tools/lookup", p["SeriesInstanceUID"])
        pacs.post("/modalities/ctmask/store", [found[0]["ID"]])  # Orthanc C-STOREs the CT series to the listener
        assert listener.wait_for(1, 60)
    finally:
        report = listener.stop()
    assert report.ok
    [log] = listener.done
    assert log.instances == len(ct) and log.error is None and log.stored is not None
    folder = tmp_path / "work" / "results" / p["StudyInstanceUID"]
    records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    _same_calls(records, _file_records(small_onnx, root / p["series_folder"]))
    if dicom_results_supported():
        assert log.results > 0 and not list((tmp_path / "work" / "spool").rglob("*.dcm"))
        assert {"SR", "PR"} <= {s.modality for s in _web(pacs).series(p["StudyInstanceUID"])}  # found by QIDO


@pytest.mark.skipif(not dicom_results_supported(), reason="needs the DICOM result objects (infer --dicom-out, "
                                                          "issue 21 part 1)")
@needs_orthanc
def test_listen_holds_results_while_orthanc_is_down_and_sends_them_once_after(pacs, study_files, small_onnx,
                                                                             tmp_path):
    root, patients, _ = study_files
    p = patients[0]
    ct = sorted((root / p["series_folder"]).iterdir())
    web = _web(pacs)
    listener = _listener(pacs, small_onnx, tmp_path / "work")
    try:
        pacs.stop()
        try:  # the study comes in while the destination is down
            c_store(ct, Destination("127.0.0.1", pacs.listen_port, "CTMASK"), "ORTHANC")
            end = time.monotonic() + 60
            while not listener.done and time.monotonic() < end:
                time.sleep(0.1)
            assert listener.done and listener.done[0].stored is None and listener.spool.pending() > 0
            held = listener.spool.pending()
        finally:
            pacs.start()
        assert listener.wait_for(1, 60)
    finally:
        report = listener.stop()
    assert report.ok and listener.spool.pending() == 0
    results = [i for i in web.instances(p["StudyInstanceUID"]) if i not in {pydicom.dcmread(f).SOPInstanceUID
                                                                           for f in ct}]
    assert len(set(results)) == len(results) >= held


def test_spool_refuses_a_file_that_is_no_dicom(tmp_path):
    f = tmp_path / "x.dcm"
    f.write_text("no dicom")
    with pytest.raises(PacsError, match="not a DICOM result file"):
        Spool(tmp_path / "spool", "http://x").add([f])
    shutil.rmtree(tmp_path / "spool", ignore_errors=True)


class _Flaky:
    """A real HTTP front for Orthanc that answers 503 to the next ``fail`` requests, then
    forwards (method, path, body, the headers that matter) and relays the answer."""

    def __init__(self, target: str, tls: tuple[Path, Path] | None = None):
        import http.server
        import threading

        import requests

        flaky = self
        self.fail, self.seen = 0, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def _relay(self):
                flaky.seen += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if flaky.fail > 0:
                    flaky.fail -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                keep = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "accept",
                                                                              "content-type")}
                r = requests.request(self.command, target + self.path, headers=keep, data=body, timeout=60)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() in ("content-type",):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = _relay

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # (certificate, key)
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@needs_orthanc
def test_5xx_answers_are_retried_with_backoff_and_results_wait_in_the_spool(pacs, study_files, tmp_path):
    root, patients, _ = study_files
    p = patients[1]
    _web(pacs).store(sorted((root / p["series_folder"]).iterdir()), p["StudyInstanceUID"])  # (again: replaced)
    flaky = _Flaky(pacs.url)
    try:
        web = DicomWeb(flaky.url, http_session(Credentials(USER, PASSWORD)), Backoff(first=0.05, total=1))
        flaky.fail = 2
        assert [s.modality for s in web.series(p["StudyInstanceUID"], p["SeriesInstanceUID"])] == ["CT"]
        assert flaky.fail == 0 and flaky.seen >= 3  # two 503s, then the answers (QIDO pages)
        results = _results(p["StudyInstanceUID"], "flaky", sorted((root / p["series_folder"]).iterdir())[:2],
                           tmp_path / "results")
        spool = Spool(tmp_path / "spool", flaky.url)
        spool.add(results)
        flaky.fail = 10**6
        held = spool.flush(lambda s, f: web.store(f, s), Backoff(first=0.05, total=0.2))
        assert held.pending == 2 and "HTTP 503" in held.status()
        flaky.fail = 0
        assert spool.flush(lambda s, f: web.store(f, s), Backoff(total=0)).sent == 2 and spool.pending() == 0
    finally:
        flaky.close()


@needs_orthanc
def test_listen_command_listens_on_loopback_and_exits_after_its_studies(pacs, study_files, small_onnx, tmp_path):
    import socket
    import subprocess
    import sys

    psutil = pytest.importorskip("psutil")
    root, patients, _ = study_files
    ct = sorted((root / patients[1]["series_folder"]).iterdir())[:2]
    port = free_port()
    cmd = [sys.executable, "-m", "ctmask", "listen", str(small_onnx), "--dest", f"127.0.0.1:{pacs.dicom_port}:ORTHANC",
           "--port", str(port), "--allow", "UPLOADER", "--idle", "0.3", "--work", str(tmp_path / "work"),
           "--exit-after", "1", "--json", str(tmp_path / "listen.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        bound = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
        assert bound == {"127.0.0.1"}
        assert c_store(ct, Destination("127.0.0.1", port, "CTMASK"), "UPLOADER") == 2
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    done = json.loads((tmp_path / "listen.json").read_text())
    assert [s["instances"] for s in done["studies"]] == [2] and done["studies"][0]["summary"]["predicted"] == 2
    assert "listening on 127.0.0.1:" in out and done["results"]["pending"] == 0


@needs_orthanc
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command (a self-signed certificate)")
def test_tls_certificates_are_verified_and_a_ca_bundle_is_trusted(pacs, study_files, small_onnx, tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days",
                    "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    root, patients, _ = study_files
    p = patients[1]
    _web(pacs).store(sorted((root / p["series_folder"]).iterdir()), p["StudyInstanceUID"])
    front = _Flaky(pacs.url, (cert, key))
    try:
        args = ["infer", small_onnx, "--dicomweb", front.url, "--study", p["StudyInstanceUID"], "--series",
                p["SeriesInstanceUID"], "--spool", tmp_path / "spool", "--retry-for", "0", "-q"]
        r = _cli(*args, env=ENV)
        assert r.exit_code == 2 and "TLS certificate not verified" in r.output and "--ca-bundle" in r.output
        r = _cli(*args, "--ca-bundle", cert, env=ENV)
        assert r.exit_code == 0, r.output
        assert "predicted 4 slices" in r.output
    finally:
        front.close()


def test_wado_multipart_is_split_to_files_whatever_the_chunking_with_a_size_cap(tmp_path):
    from ctmask.pacs.multipart import boundary_of, split_parts

    parts = [b"\x00" * 128 + b"DICM" + bytes(range(256)) * 2, b"", b"\r\n--not-the-boundary\r\n" * 5, b"x" * 900]
    body = b"preamble\r\n" + b"".join(b"--b0und\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                                      for p in parts) + b"--b0und--\r\nepilogue"
    assert boundary_of('multipart/related; type="application/dicom"; boundary="b0und"') == b"b0und"
    for step in (1, 2, 3, 7, 64, len(body)):
        folder = tmp_path / str(step)
        folder.mkdir()

        def open_part(n, folder=folder):
            return folder / f"{n}.dcm", open(folder / f"{n}.dcm", "wb")

        written, refused = split_parts((body[i:i + step] for i in range(0, len(body), step)), b"b0und", open_part,
                                       limit=800)
        assert [p.read_bytes() for p in written] == parts[:3] and refused == [(4, "over 800 bytes: refused")]
        assert sorted(p.name for p in folder.iterdir()) == ["1.dcm", "2.dcm", "3.dcm"]  # the refused one removed
    with pytest.raises(PacsError, match="cut short"):
        split_parts([body[:300]], b"b0und", lambda n: (tmp_path / "cut.dcm", open(tmp_path / "cut.dcm", "wb")))
    with pytest.raises(PacsError, match="not multipart/related"):
        boundary_of("application/json")


# --- hostile peers (review of issue 21 part 2) ---------------------------------------------------

def _tiny_instance(path: Path, study: str, sop: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, "1.2.3.4", "OT"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_qido_series_uid_that_is_a_path_is_refused_before_any_folder_is_touched(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    web = DicomWeb("http://127.0.0.1:9/dicom-web", http_session(Credentials()), Backoff(total=0))
    evil = "../../victim"
    monkeypatch.setattr(web.client, "search_for_series", lambda *a, **k: [
        {"0020000E": {"vr": "UI", "Value": [evil]}, "00080060": {"vr": "CS", "Value": ["CT"]}}])
    with pytest.raises(PacsError, match="no UID"):
        web.series("1.2.3")
    with pytest.raises(PacsError, match="not a DICOM UID"):  # the folder it would have emptied first
        web.fetch_series("1.2.3", evil, tmp_path / "tmp" / "series" / evil)
    assert (victim / "keep.txt").read_text() == "mine"


def test_dicomweb_refuses_credentials_and_uids_that_are_no_uids_on_the_command_line(tmp_path):
    r = _cli("infer", tmp_path / "m.onnx", "--dicomweb", "http://alice:s3cret@127.0.0.1:9/dicom-web",
             "--study", "1.2", env={})
    assert r.exit_code == 2 and "holds credentials" in r.output and "s3cret" not in r.output
    for flag, uid in (("--study", "../../etc"), ("--series", "1.2/../3")):
        args = ["--study", "1.2", flag, uid] if flag == "--series" else ["--study", uid]
        r = _cli("infer", tmp_path / "m.onnx", "--dicomweb", "http://127.0.0.1:9/dicom-web", *args, env={})
        assert r.exit_code == 2 and "not a DICOM UID" in r.output, r.output
    from ctmask.cli.pacs import plain_http_warning

    assert "plain HTTP" in (plain_http_warning("http://pacs.example.org/dicom-web", True) or "")
    assert plain_http_warning("https://pacs.example.org/dicom-web", True) is None
    assert plain_http_warning("http://127.0.0.1:8042/dicom-web", True) is None
    assert plain_http_warning("http://pacs.example.org/dicom-web", False) is None


def test_a_corrupt_spool_file_is_held_and_named_not_a_crash(tmp_path):
    study = "1.2.826.0.1.3680043.8.498.1"
    spool = Spool(tmp_path / "spool", "http://127.0.0.1:9/dicom-web")
    spool.add([_tiny_instance(tmp_path / "r.dcm", study, study + ".1")])
    [f] = spool.studies()[study]
    f.write_bytes(b"\x00" * 10)  # a disk fault, a half-written copy by hand
    web = DicomWeb("http://127.0.0.1:9/dicom-web", http_session(Credentials()), Backoff(total=0))
    report = spool.flush(lambda s, files: web.store(files, s), Backoff(total=0))
    assert report.pending == 1 and "not a DICOM file" in report.errors[0]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_the_scp_refuses_instances_whose_uids_are_paths(tmp_path):
    from ctmask.pacs.dimse import StorageSCP

    got = []
    port = free_port()
    scp = StorageSCP("CTMASK", "127.0.0.1", port, (), lambda *a: got.append(a[:2]))
    scp.start()
    try:
        dest = Destination("127.0.0.1", port, "CTMASK")
        for i, (study, sop) in enumerate((("..", "1.2.3.1"), (".", "1.2.3.2"), ("1.2.3", "../../x"))):
            with pytest.raises(PacsError, match="refused"):
                c_store([_tiny_instance(tmp_path / f"{i}.dcm", study, sop)], dest)
        assert c_store([_tiny_instance(tmp_path / "ok.dcm", "1.2.3", "1.2.3.9")], dest) == 1
    finally:
        scp.stop()
    assert got == [("1.2.3", "1.2.3.9")]


def test_wado_answers_without_end_are_abandoned_not_read_for_ever(tmp_path):
    import itertools

    from ctmask.pacs.multipart import split_parts

    def open_part(n):
        return tmp_path / f"{n}.dcm", open(tmp_path / f"{n}.dcm", "wb")

    endless = itertools.repeat(b"x" * 4096)  # a server streaming without the boundary it announced
    with pytest.raises(PacsError, match="no boundary"):
        split_parts(endless, b"b0und", open_part)
    part = itertools.chain([b"--b0und\r\n\r\n"], itertools.repeat(b"y" * 4096))  # one part without end
    with pytest.raises(PacsError, match="still coming"):
        split_parts(part, b"b0und", open_part, limit=1 << 16)
    now = iter(range(0, 10**6, 30))  # a byte every 30 s: under any per-read timeout
    trickle = itertools.chain([b"--b0und\r\n\r\n"], itertools.repeat(b"t"))
    with pytest.raises(PacsError, match="bytes/s: abandoned"):
        split_parts(trickle, b"b0und", open_part, clock=lambda: float(next(now)))
    assert not list(tmp_path.iterdir())
    tiny = itertools.repeat(b"--b0und\r\n\r\nz\r\n")  # parts without end: the disk filled with files
    with pytest.raises(PacsError, match="over 50 instances"):
        split_parts(tiny, b"b0und", open_part, max_parts=50)


def test_the_scp_aborts_an_association_whose_instance_passes_the_size_cap(tmp_path):
    import numpy as np

    from ctmask.pacs.dimse import StorageSCP

    got = []
    port = free_port()
    scp = StorageSCP("CTMASK", "127.0.0.1", port, (), lambda *a: got.append(a[:2]), max_instance_bytes=256 << 10)
    scp.start()
    try:
        dest = Destination("127.0.0.1", port, "CTMASK")
        big = _tiny_instance(tmp_path / "big.dcm", "1.2.3", "1.2.3.1")
        ds = pydicom.dcmread(big)
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.zeros((512, 512), np.uint16).tobytes()  # 512 KiB, over the 256 KiB cap
        ds["PixelData"].VR = "OW"
        ds.save_as(big)
        with pytest.raises((TransientError, PacsError)):
            c_store([big], dest, timeout=5)
        assert c_store([_tiny_instance(tmp_path / "ok.dcm", "1.2.3", "1.2.3.9")], dest) == 1  # still listening
    finally:
        scp.stop()
    assert got == [("1.2.3", "1.2.3.9")]


def test_an_instance_sent_twice_is_counted_once_and_a_backoff_without_waits_is_refused(tmp_path):
    from ctmask.pacs.listen import Listener, ListenOptions
    from ctmask.pacs.study import StudySettings

    options = ListenOptions(Destination("127.0.0.1", 9, "PACS"), tmp_path / "work")
    listener = Listener(options, StudySettings(tmp_path / "m.onnx"), lambda: None)  # type: ignore[arg-type,return-value]
    for _ in range(2):
        listener._store("1.2.3", "1.2.3.1", b"x")
    listener._store("1.2.3", "1.2.3.2", b"y")
    assert listener.log["1.2.3"].instances == 2
    with pytest.raises(ValueError):
        Backoff(first=0, total=10)  # its waits would be 0, 0, 0, ... for ever


def test_a_study_that_fails_for_an_unexpected_reason_is_done_with_its_error_not_lost(tmp_path, monkeypatch):
    import ctmask.pacs.listen as listen
    from ctmask.pacs.study import StudySettings

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(listen, "infer_folder", broken)
    options = listen.ListenOptions(Destination("127.0.0.1", 9, "PACS"), tmp_path / "work")
    listener = listen.Listener(options, StudySettings(tmp_path / "m.onnx"), lambda: None)  # type: ignore[arg-type,return-value]
    listener._runner = None  # type: ignore[assignment]
    listener._store("1.2.3", "1.2.3.1", b"x")
    listener._process("1.2.3")
    [log] = listener.done  # --exit-after counts it (it waited for ever), the exit status is 1
    assert "No space left" in (log.error or "") and listener.wait_for(1, 0.1)


def test_a_spool_that_is_a_file_is_refused_before_anything_is_pulled(tmp_path):
    (tmp_path / "spool").write_text("not a folder")
    with pytest.raises(ConfigError, match="spool is not a folder"):
        Spool(tmp_path / "spool", "http://x")
    r = _cli("infer", tmp_path / "m.onnx", "--dicomweb", f"http://127.0.0.1:{free_port()}/dicom-web", "--study",
             "1.2", "--spool", tmp_path / "spool", "--retry-for", "0", env={})
    assert r.exit_code == 2 and "spool is not a folder" in r.output, r.output


def test_a_credentials_file_that_is_a_device_or_a_fifo_is_refused_unread(tmp_path):
    fifo = tmp_path / "creds.fifo"
    os.mkfifo(fifo, 0o600)  # reading it would block for ever; /dev/zero would fill the memory
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ConfigError, match="regular file"):
            read_credentials({}, path)


def test_a_redirect_loop_or_a_broken_encoding_is_a_pacs_error_not_a_traceback():
    import requests

    from ctmask.pacs.dicomweb import call

    for exc in (requests.TooManyRedirects("30 redirects"), requests.exceptions.ContentDecodingError("bad gzip")):
        def fail(exc=exc):
            raise exc

        with pytest.raises(PacsError, match=type(exc).__name__):
            call("QIDO-RS series", "http://x/dicom-web", fail)
