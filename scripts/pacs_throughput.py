"""Throughput of ``ctmask listen`` against ``ctmask infer`` on the same files (docs/pacs.md).

A synthetic study of N slices (default 300) is written to disk; then

1. ``ctmask infer MODEL SERIES --out ... --dicom-out ...`` on the files (the same result objects
   the listener sends), timed as a command (wall clock: start, model load, reading, inference,
   outputs);
2. a listener (the ``ctmask listen`` machinery, model loaded at start as the command does) with
   a real Orthanc as its destination (tests/orthanc_server.py, started here); the study is sent
   to it by C-STORE (pynetdicom, over loopback) and timed from the first instance received to the
   results stored in Orthanc (or, while this ctmask writes no DICOM result objects, to the study
   predicted).

Usage: ``python scripts/pacs_throughput.py MODEL [--slices 300] [--idle 1] [--work DIR]``; prints
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--idle", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ctmask-pacs-throughput-"))
    from ctmask.data.synth_dicom import synthesize_dicom

    synthesize_dicom(work / "synth", patients=1, slices_per_patient=args.slices, seed=11, workers=2)
    patient = json.loads((work / "synth" / "manifest.json").read_text())["patients"][0]
    series = work / "synth" / patient["series_folder"]
    files = sorted(series.iterdir())

    t0 = time.perf_counter()
    from ctmask.pacs.study import dicom_results_supported

    same_outputs = ["--dicom-out", str(work / "files-dicom")] if dicom_results_supported() else []
    done = subprocess.run([sys.executable, "-m", "ctmask", "infer", str(args.model), str(series), "--out",
                           str(work / "files.jsonl"), "-q", "--json", str(work / "files.json"), *same_outputs],
                          capture_output=True, text=True)
    file_wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(done.stderr)
    file_summary = json.loads((work / "files.json").read_text())

    listen = _listen(args.model, files, work, args.idle)
    print(json.dumps({"slices": len(files), "file_infer_wall_s": round(file_wall, 2),
                      "file_infer_summary_s": file_summary["seconds"], **listen,
                      "ratio": round(listen["listen_first_received_to_done_s"] / file_wall, 2)}, indent=2))


def _listen(model: Path, files: list[Path], work: Path, idle: float) -> dict:
    from orthanc_server import Orthanc, free_port

    from ctmask.backends.registry import make_runner
    from ctmask.pacs.dimse import Destination, c_store
    from ctmask.pacs.listen import Listener, ListenOptions
    from ctmask.pacs.study import StudySettings, dicom_results_supported

    (work / "orthanc").mkdir(exist_ok=True)
    pacs = Orthanc(work / "orthanc").start()
    try:
        port = free_port()
        options = ListenOptions(Destination("127.0.0.1", pacs.dicom_port, Orthanc.AE), work / "listen", port=port,
                                allow=("SENDER",), idle=idle)
        listener = Listener(options, StudySettings(model), lambda: make_runner(model, "auto", "cpu", None))
        listener.start()
        t0 = time.time()
        c_store(files, Destination("127.0.0.1", port, "CTMASK"), "SENDER")
        sent = time.time()
        if not listener.wait_for(1, 3600):
            sys.exit("the study was not done within an hour")
        listener.stop()
    finally:
        pacs.stop()
    [log] = listener.done
    end = log.stored if log.results else log.predicted
    assert end is not None
    return {"dicom_results": dicom_results_supported(), "result_objects": log.results, "idle_s": idle,
            "cstore_send_s": round(sent - t0, 2), "listen_first_received_to_done_s": round(end - log.first_received, 2),
            "listen_last_received_to_predicted_s": round((log.predicted or 0) - log.last_received, 2),
            "done_means": "results stored in Orthanc" if log.results else "study predicted (no result objects)"}


if __name__ == "__main__":
    main()
