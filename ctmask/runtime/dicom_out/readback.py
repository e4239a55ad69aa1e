"""Read a ctmask SR back with highdicom, into the terms of the JSONL records (for checks).

:func:`read_report` turns the TID 1500 report :mod:`.sr` writes into plain values: the study
call and its probability, each driving slice's instance, call and probability, and each
planar region's instance, box, score and lesion class; the test suite compares them with the
run's JSONL records.
"""

from __future__ import annotations

from pathlib import Path

from ctmask.runtime.dicom_out.codes import CODES


def _name(coded) -> str:
    """ctmask's name of a coded concept (the :data:`CODES` key), or its meaning if unknown."""
    for name, concept in CODES.items():
        if concept.code.value == coded.value and concept.code.scheme_designator == coded.scheme_designator:
            return name
    return str(coded.meaning)


def _probability(group) -> float:
    values = [float(m.value) for m in group.get_measurements() if _name(m.name) == "probability"]
    if len(values) != 1:
        raise ValueError(f"group {group.tracking_identifier!r} holds {len(values)} probabilities, not 1")
    return values[0]


def read_report(path: str | Path) -> dict:
    """The report of ``path``: ``{"study", "call", "probability", "rule", "slices": [{"uid",
    "call", "probability"}], "regions": [{"uid", "box", "score", "lesion"}]}``.

    Raises:
        ValueError: the file is no ctmask report (a group missing, or one too many).
    """
    import highdicom as hd

    sr = hd.sr.srread(str(path))
    report = sr.content
    groups = report.get_image_measurement_groups()
    study = [g for g in groups if g.tracking_identifier == "study call"]
    if len(study) != 1:
        raise ValueError(f"{path}: {len(study)} study-level groups, not 1")
    params = [str(item.TextValue) for item in study[0][0].ContentSequence  # the group's container item
              if item.ValueType == "TEXT" and str(item.ConceptNameCodeSequence[0].CodeValue) == "111002"]
    slices = [{"uid": g.source_images[0].referenced_sop_instance_uid, "call": _name(g.finding_type),
               "probability": _probability(g)} for g in groups if g is not study[0]]
    regions = []
    for g in report.get_planar_roi_measurement_groups():
        x, y = g.roi.value[:, 0], g.roi.value[:, 1]
        regions.append({"uid": str(g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
                        "box": [float(x.min()), float(y.min()), float(x.max()), float(y.max())],
                        "score": _probability(g), "lesion": _name(g.finding_type)})
    rules = [p.removeprefix("rule ") for p in params if p.startswith("rule ")]
    return {"study": str(sr.StudyInstanceUID), "call": _name(study[0].finding_type),
            "probability": _probability(study[0]), "rule": rules[0] if rules else None, "slices": slices,
            "regions": regions}
