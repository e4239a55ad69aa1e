"""Study-level aggregation (ctmask.runtime.study): the rule, on hand-made slices, and the writers."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass

import pytest

from ctmask.core.errors import ConfigError
from ctmask.runtime.study import RULE, DrivingSlice, StudyPrediction, StudyWriter, aggregate

CLASSES = ("normal", "pneumonia", "covid19")


@dataclass
class S:
    """A slice result with the attributes aggregate() reads."""

    key: str
    probs: dict
    study: str = "st1"
    series: str = "se1"
    position: float | None = None
    label: str = ""

    @property
    def class_name(self) -> str:
        return max(CLASSES, key=lambda c: self.probs[c])


def probs(n: float, p: float, c: float) -> dict:
    return {"normal": n, "pneumonia": p, "covid19": c}


def normal_slice(i: int, study: str = "st1") -> S:
    return S(f"ct/{study}/IM{i:03d}", probs(0.98, 0.01, 0.01), study=study, position=float(i), label=f"IM{i:03d}")


def covid_slice(i: int, p: float = 0.95, study: str = "st1") -> S:
    return S(f"ct/{study}/IM{i:03d}", probs(0.03, 0.02, p), study=study, position=float(i), label=f"IM{i:03d}")


def test_a_study_of_one_slice_is_that_slice():
    for p in (probs(0.7, 0.2, 0.1), probs(0.1, 0.3, 0.6), probs(0.2, 0.5, 0.3), probs(0.333333, 0.333334, 0.333333)):
        sl = S("a.png", p, study="", series="", label="a.png")
        [st] = aggregate([sl], CLASSES)
        assert st.class_name == sl.class_name and st.class_index == CLASSES.index(sl.class_name)
        assert st.probs == p and st.scores == p
        assert st.study == "a.png" and st.series == ["a.png"] and st.n_slices == 1  # a loose image is its own study
        assert st.driving == [DrivingSlice("a.png", "a.png", p[sl.class_name], None)]
        assert st.rule == f"{RULE} k=1"


def test_a_few_confident_lesion_slices_make_the_study_abnormal():
    slices = [normal_slice(i) for i in range(20)] + [covid_slice(20, 0.95), covid_slice(21, 0.97), covid_slice(22, 0.9)]
    [st] = aggregate(slices, CLASSES)
    assert st.class_name == "covid19" and st.class_index == 2 and st.n_slices == 23
    # s_covid = (0.97 + 0.95 + 0.9 + 0.01 + 0.01) / 5; s_normal = (0.03 * 3 + 0.98 * 2) / 5
    assert st.scores["covid19"] == pytest.approx(2.84 / 5) and st.scores["normal"] == pytest.approx(2.05 / 5)
    assert sum(st.probs.values()) == pytest.approx(1, abs=1e-5)
    assert st.probs["covid19"] == pytest.approx(st.scores["covid19"] / sum(st.scores.values()), abs=1e-6)
    # Driving: the 3 lesion slices, most confident first, then the 2 ties at 0.01 by key.
    assert [(d.label, d.prob) for d in st.driving] == [
        ("IM021", 0.97), ("IM020", 0.95), ("IM022", 0.9), ("IM000", 0.01), ("IM001", 0.01)]
    assert st.driving[0] == DrivingSlice("IM021", "ct/st1/IM021", 0.97, 21.0)


def test_stray_lesion_slices_are_outvoted():
    slices = [normal_slice(i) for i in range(20)] + [covid_slice(20), covid_slice(21)]
    [st] = aggregate(slices, CLASSES)
    assert st.class_name == "normal"
    # Normal is driven by the least normal slices: the two stray ones come first.
    assert [d.label for d in st.driving] == ["IM020", "IM021", "IM000", "IM001", "IM002"]
    assert [d.prob for d in st.driving] == [0.03, 0.03, 0.98, 0.98, 0.98]
    # A smaller top_k lets them through.
    assert aggregate(slices, CLASSES, top_k=2)[0].class_name == "covid19"


def test_small_study_uses_all_its_slices():
    [st] = aggregate([normal_slice(0), covid_slice(1), covid_slice(2)], CLASSES)
    assert st.rule == f"{RULE} k=3" and st.class_name == "covid19" and len(st.driving) == 3


def test_result_does_not_depend_on_slice_order():
    slices = [normal_slice(i) for i in range(12)] + [covid_slice(12 + i, 0.6 + 0.1 * i) for i in range(3)]
    slices += [normal_slice(i, study="st0") for i in range(4)] + [S("x", probs(0.2, 0.7, 0.1), study="st0")]
    expected = [s.to_dict() for s in aggregate(slices, CLASSES)]
    rng = random.Random(0)
    for _ in range(20):
        rng.shuffle(slices)
        assert [s.to_dict() for s in aggregate(slices, CLASSES)] == expected
    assert [s["study"] for s in expected] == ["st0", "st1"]  # sorted by study key


def test_ties_are_deterministic():
    # Equal scores: the class more slices were called as, then the model's class order.
    tied = probs(0.4, 0.4, 0.2)
    called_pneumonia = {"key": "b", "probs": tied, "class": "pneumonia"}
    assert aggregate([called_pneumonia], CLASSES)[0].class_name == "pneumonia"
    assert aggregate([{"key": "b", "probs": tied}], CLASSES)[0].class_name == "normal"
    # Slices with equal probabilities: ranked by key, whatever their order.
    same = [S(k, probs(0.1, 0.1, 0.8)) for k in ("d", "b", "a", "e", "c", "f")]
    for order in (same, same[::-1]):
        assert [d.key for d in aggregate(order, CLASSES)[0].driving] == ["a", "b", "c", "d", "e"]


def test_groups_studies_and_series_and_reads_prediction_dicts():
    recs = [
        {"file": "s1/a.dcm", "class": "normal", "probs": probs(0.9, 0.05, 0.05), "study": "1.2.3", "series": "1.2.3.2"},
        {"file": "s1/b.dcm", "class": "normal", "probs": probs(0.8, 0.1, 0.1), "study": "1.2.3", "series": "1.2.3.1"},
        {"key": "vol.nii.gz#4", "class_name": "covid19", "probs": probs(0.1, 0.1, 0.8), "study": "vol.nii.gz",
         "label": "vol.nii.gz[z=4]", "position": 12.5},
    ]
    by_study = {s.study: s for s in aggregate(recs, CLASSES)}
    assert by_study["1.2.3"].series == ["1.2.3.1", "1.2.3.2"] and by_study["1.2.3"].n_slices == 2
    assert by_study["1.2.3"].driving[0] == DrivingSlice("s1/b.dcm", "s1/b.dcm", 0.8, None)  # least normal first
    assert by_study["vol.nii.gz"].series == ["vol.nii.gz"]
    assert by_study["vol.nii.gz"].driving == [DrivingSlice("vol.nii.gz[z=4]", "vol.nii.gz#4", 0.8, 12.5)]


def test_bad_input_is_refused():
    with pytest.raises(ConfigError):
        aggregate([normal_slice(0)], CLASSES, top_k=0)
    with pytest.raises(ConfigError):
        aggregate([normal_slice(0)], ("a", "b"))  # no normal class
    assert aggregate([{"key": "k", "probs": {"a": 0.3, "b": 0.7}}], ("a", "b"), normal="a")[0].class_name == "b"
    with pytest.raises(ValueError, match="no probability for covid19"):
        aggregate([{"key": "k", "probs": {"normal": 1.0, "pneumonia": 0.0}}], CLASSES)
    assert aggregate([], CLASSES) == []


def studies() -> list[StudyPrediction]:
    slices = [normal_slice(i) for i in range(6)] + [covid_slice(i, study="st2") for i in range(3)]
    return aggregate(slices, CLASSES, top_k=2)


def test_jsonl_writer(tmp_path):
    out = tmp_path / "studies.jsonl"
    with StudyWriter(out) as w:
        for st in studies():
            w.write(st)
    assert w.count == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [st.to_dict() for st in studies()]
    assert rows[1]["class"] == "covid19" and rows[1]["driving"][0] == {
        "label": "IM000", "key": "ct/st2/IM000", "prob": 0.95, "position": 0.0}
    assert [p.name for p in tmp_path.iterdir()] == ["studies.jsonl"]  # no temporary file left


def test_csv_writer(tmp_path):
    out = tmp_path / "studies.csv"
    with StudyWriter(out, CLASSES) as w:
        for st in studies():
            w.write(st)
    rows = list(csv.DictReader(out.open(newline="")))
    assert list(rows[0]) == ["study", "class", "class_index", "prob_normal", "prob_pneumonia", "prob_covid19",
                             "n_slices", "series", "rule", "driving"]
    assert [(r["study"], r["class"], r["n_slices"]) for r in rows] == [("st1", "normal", "6"), ("st2", "covid19", "3")]
    assert float(rows[1]["prob_covid19"]) == studies()[1].probs["covid19"]
    assert json.loads(rows[1]["series"]) == ["se1"] and rows[1]["rule"] == f"{RULE} k=2"
    assert json.loads(rows[1]["driving"]) == [["IM000", 0.95], ["IM001", 0.95]]
    # Without class names the columns come from the first record; an empty file still has its header.
    with StudyWriter(tmp_path / "b.csv") as w:
        w.write(studies()[0])
    assert (tmp_path / "b.csv").read_text().splitlines()[0].startswith("study,class,class_index,prob_normal,")
    with StudyWriter(tmp_path / "empty.csv"):
        pass
    assert (tmp_path / "empty.csv").read_text().strip() == "study,class,class_index,n_slices,series,rule,driving"


@pytest.mark.parametrize("name", ["studies.jsonl", "studies.csv"])
def test_writer_leaves_no_partial_file_on_error(tmp_path, name):
    out = tmp_path / name
    with pytest.raises(RuntimeError, match="boom"):
        with StudyWriter(out, CLASSES) as w:
            w.write(studies()[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    out.write_text("previous run\n")
    with pytest.raises(RuntimeError):
        with StudyWriter(out, CLASSES) as w:
            w.write(studies()[0])
            raise RuntimeError("boom")
    assert out.read_text() == "previous run\n" and list(tmp_path.iterdir()) == [out]


def test_writer_refuses_unknown_suffix(tmp_path):
    with pytest.raises(ConfigError, match="use .jsonl, .csv or .parquet"):
        StudyWriter(tmp_path / "studies.txt")
