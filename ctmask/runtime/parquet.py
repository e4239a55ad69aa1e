"""Parquet output of ``infer`` (``--out X.parquet``, ``--studies Y.parquet``), with pyarrow.

One row per slice (or study), typed columns: the class probabilities are one ``prob_<class>``
column each (model order), the RoI rows and boxes nested lists, ``size`` [H, W]. The file's
schema metadata says what wrote it: ``ctmask.format`` (:data:`SLICES_FORMAT` /
:data:`STUDIES_FORMAT`) and the class names. Reading a slices file back
(:func:`read_slices`) gives the records ``--resume`` needs, as the JSONL lines would.
pyarrow comes with ``pip install 'ctmask[ray]'``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctmask.core.errors import DataError

SLICES_FORMAT = "ctmask-slices/1"
STUDIES_FORMAT = "ctmask-studies/1"


def _pa():
    import pyarrow as pa  # the `ray` extra; user_errors names it when missing
    import pyarrow.parquet as pq

    return pa, pq


def _slice_schema(class_names: Sequence[str]):
    pa, _ = _pa()
    rows = pa.list_(pa.list_(pa.float64()))
    return pa.schema([
        ("file", pa.string()), ("key", pa.string()), ("id", pa.string()), ("label", pa.string()),
        ("study", pa.string()), ("series", pa.string()), ("position", pa.float64()), ("frame", pa.int64()),
        ("class", pa.string()), ("class_index", pa.int64()), *((f"prob_{c}", pa.float64()) for c in class_names),
        ("n_rois", pa.int64()), ("top_rois", rows), ("top_boxes", rows), ("kind", pa.string()),
        ("size", pa.list_(pa.int64())), ("overlay", pa.string()), ("names_json", pa.string()),
    ], metadata={"ctmask.format": SLICES_FORMAT, "ctmask.class_names": json.dumps(list(class_names))})


def _study_schema(class_names: Sequence[str]):
    pa, _ = _pa()
    driving = pa.list_(pa.struct([("label", pa.string()), ("key", pa.string()), ("prob", pa.float64()),
                                  ("position", pa.float64())]))
    return pa.schema([
        ("study", pa.string()), ("class", pa.string()), ("class_index", pa.int64()),
        *((f"prob_{c}", pa.float64()) for c in class_names), *((f"score_{c}", pa.float64()) for c in class_names),
        ("n_slices", pa.int64()), ("series", pa.list_(pa.string())), ("rule", pa.string()), ("driving", driving),
        ("names_json", pa.string()),
    ], metadata={"ctmask.format": STUDIES_FORMAT, "ctmask.class_names": json.dumps(list(class_names))})


def _surrogate_safe(value: Any) -> Any:
    """Arrow strings are UTF-8: a file name that is not (kept with surrogateescape) is written
    with its undecodable bytes as U+FFFD (JSONL and CSV keep them byte for byte)."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_surrogate_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _surrogate_safe(v) for k, v in value.items()}
    return value


NAME_FIELDS = ("file", "key", "label", "study", "series", "overlay")
"""Fields that hold file names, which need not be UTF-8."""


def _not_utf8(value: Any) -> bool:
    """True when a string inside ``value`` (lists, dicts) holds undecodable bytes (surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, (list, tuple)):
        return any(_not_utf8(v) for v in value)
    if isinstance(value, dict):
        return any(_not_utf8(v) for v in value.values())
    return False


def _names_json(rec: dict) -> str | None:
    """The name fields as ASCII JSON (undecodable bytes kept as ``\\udcXX`` escapes, which
    ``json.loads`` turns back into the same surrogates) when one is not valid UTF-8, else None."""
    names = {k: rec[k] for k in NAME_FIELDS if isinstance(rec.get(k), str)}
    return json.dumps(names) if _not_utf8(names) else None


def write_slices(path: str | Path, records: list[dict], class_names: Sequence[str]) -> None:
    """Write slice records (:meth:`~ctmask.runtime.predict.Prediction.to_dict`) to ``path`` (the
    caller makes it atomic). A record whose file name is not UTF-8 is written with U+FFFD in the
    string columns and its exact names in ``names_json`` (read back by :func:`read_slices`)."""
    _, pq = _pa()
    schema = _slice_schema(class_names)
    rows = []
    for rec in records:
        row = {k: rec.get(k) for k in schema.names if not k.startswith("prob_") and k != "names_json"}
        row.update({f"prob_{c}": rec["probs"].get(c) for c in class_names})
        row = _surrogate_safe(row)
        row["names_json"] = _names_json(rec)
        rows.append(row)
    _write(pq, path, rows, schema)


def write_studies(path: str | Path, studies: list[dict], class_names: Sequence[str]) -> None:
    """Write study records (:meth:`~ctmask.runtime.study.StudyPrediction.to_dict`) to ``path``;
    as for slices, a study whose names are not UTF-8 keeps them exactly in ``names_json``
    (``study``, ``series``, ``driving`` as JSON)."""
    _, pq = _pa()
    schema = _study_schema(class_names)
    rows = []
    for s in studies:
        row = {k: s.get(k) for k in ("study", "class", "class_index", "n_slices", "series", "rule", "driving")}
        row.update({f"prob_{c}": s["probs"].get(c) for c in class_names})
        row.update({f"score_{c}": s["scores"].get(c) for c in class_names})
        names = {k: s.get(k) for k in ("study", "series", "driving")}
        row = _surrogate_safe(row)
        row["names_json"] = json.dumps(names) if _not_utf8(names) else None
        rows.append(row)
    _write(pq, path, rows, schema)


def _write(pq, path: str | Path, rows: list[dict], schema) -> None:
    pa, _ = _pa()
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path), compression="zstd")


def read_slices(path: str | Path) -> list[dict]:
    """The slice records of a ctmask Parquet file, as :meth:`Prediction.to_dict` gives them
    (``None`` fields left out).

    Raises:
        DataError: not a Parquet file, or not one ctmask wrote.
    """
    _, pq = _pa()
    try:
        table = pq.read_table(str(path))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...
        raise DataError(f"not a Parquet file ({exc.__class__.__name__}: {str(exc)[:200]})", path) from None
    meta = table.schema.metadata or {}
    if meta.get(b"ctmask.format", b"").decode() != SLICES_FORMAT:
        raise DataError(f"not a ctmask predictions file (its schema metadata has no ctmask.format {SLICES_FORMAT})",
                        path)
    out = []
    for n, row in enumerate(table.to_pylist(), 1):
        names = row.pop("names_json", None)
        rec: dict[str, Any] = {"probs": {k[5:]: v for k, v in row.items() if k.startswith("prob_") and v is not None}}
        rec.update({k: v for k, v in row.items() if not k.startswith("prob_") and v is not None})
        if names is not None:
            try:
                exact = json.loads(names)
            except ValueError:
                raise DataError(f"row {n}: names_json is not JSON: not a ctmask predictions file", path) from None
            if not isinstance(exact, dict):
                raise DataError(f"row {n}: names_json is not an object: not a ctmask predictions file", path)
            rec.update({k: v for k, v in exact.items() if k in NAME_FIELDS and isinstance(v, str)})
        out.append(rec)
    return out
