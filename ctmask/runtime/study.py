"""Study-level prediction: one call per study from its slices' probabilities.

The rule (``topk-mean/1``). A study's slices are pooled per class with ``k = min(top_k, n)``
(``top_k`` = 5 by default, ``n`` = the study's slice count):

- each lesion class ``c`` (every class but normal: pneumonia, COVID-19) scores
  ``s_c`` = the mean of the ``k`` highest slice probabilities of ``c``: the study's most
  convincing slices for ``c``;
- the normal class scores ``s_normal`` = the mean of the ``k`` *lowest* slice probabilities
  of normal: a study is normal only if even its ``k`` least normal slices look normal.

The study calls the class with the highest score. Lesions show on a subset of a study's
slices, so a handful of confident lesion slices among many normal ones make the study
abnormal: with ``k = 5``, three slices at COVID-19 0.95 (normal 0.03) among slices at
normal 0.98 (COVID-19 0.01) give ``s_covid19`` = 0.574 against ``s_normal`` = 0.410, while one
or two stray slices are outvoted (they fill at most two of the five places of the mean).
Ties between scores go to the class more slices were called as, then to the earlier class
in the model's order. Every step is a sort, so the result does not depend on the order of
the slices; slices with equal probabilities are ranked by their key.

The reported ``probs`` are the scores divided by their sum (so they sum to 1); the raw
scores are kept as ``scores``. The slices that drove the call are the ``k`` slices the
called class's score averaged, with their probability of that class: for a lesion class
its most confident slices, for normal the least normal ones. A study of one slice
(``k = 1``) is that slice's prediction: same class, same probabilities.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ctmask.core.errors import ConfigError
from ctmask.core.fileio import atomic_path, close_atomic, output_error
from ctmask.core.spreadsheet import safe_row

RULE = "topk-mean/1"
"""Name of the aggregation rule (written in every record; bumped if the rule changes)."""

TOP_K = 5
"""Default number of slices pooled per class."""


class SliceResult(Protocol):
    """What :func:`aggregate` reads from a slice (attributes, or the same keys of a dict).

    A dict may say ``file`` for ``key`` and ``class`` for ``class_name`` (a
    :class:`~ctmask.runtime.predict.Prediction` record). A missing ``study`` makes the
    slice a study of its own (keyed by the slice key); a missing ``series`` is the study.
    """

    key: str
    study: str
    series: str
    position: float | None
    label: str
    probs: Mapping[str, float]
    class_name: str


class DrivingSlice(NamedTuple):
    """A slice that drove a study's call: ``(label, key, prob, position)``, ``prob`` being its
    probability of the called class."""

    label: str
    key: str
    prob: float
    position: float | None = None

    def to_dict(self) -> dict:
        return {"label": self.label, "key": self.key, "prob": self.prob, "position": self.position}


@dataclass
class StudyPrediction:
    """One study's result (see the module docstring for the rule).

    Attributes:
        study: study key (DICOM StudyInstanceUID, NIfTI path, or a loose image's own path).
        series: the keys of the study's series, sorted.
        n_slices: slices pooled.
        class_name: the call.
        class_index: its index in the model's classes.
        probs: the scores normalised to sum to 1, per class (model order).
        scores: the raw scores ``s_c`` per class.
        rule: the rule and the ``k`` used, e.g. ``topk-mean/1 k=5``.
        driving: the ``k`` slices behind the called class's score, the most decisive first.
    """

    study: str
    series: list[str]
    n_slices: int
    class_name: str
    class_index: int
    probs: dict[str, float]
    scores: dict[str, float]
    rule: str
    driving: list[DrivingSlice] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"study": self.study, "class": self.class_name, "class_index": self.class_index,
                "probs": self.probs, "scores": self.scores, "n_slices": self.n_slices, "series": self.series,
                "rule": self.rule, "driving": [d.to_dict() for d in self.driving]}


@dataclass(frozen=True)
class _Slice:
    key: str
    study: str
    series: str
    position: float | None
    label: str
    probs: dict[str, float]
    class_name: str


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``obj`` has (as a key of a mapping, or an attribute) and that is not None."""
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return default


def _read_slice(obj: SliceResult | Mapping[str, Any], class_names: Sequence[str]) -> _Slice:
    key = _get(obj, "key", "file")
    if key is None:
        raise ValueError(f"slice record without a key (or file): {obj!r}")
    key = str(key)
    probs_in = _get(obj, "probs", default={})
    missing = [c for c in class_names if c not in probs_in]
    if missing:
        raise ValueError(f"slice {key}: no probability for {', '.join(missing)}")
    probs = {c: float(probs_in[c]) for c in class_names}
    study = str(_get(obj, "study", default="") or key)
    position = _get(obj, "position")
    return _Slice(
        key=key,
        study=study,
        series=str(_get(obj, "series", default="") or study),
        position=None if position is None else float(position),
        label=str(_get(obj, "label", default="") or key),
        probs=probs,
        class_name=str(_get(obj, "class_name", "class", default="")),
    )


def normal_class(class_names: Sequence[str]) -> str:
    """The class that means "no lesion": the one named ``normal`` (any case).

    Raises:
        ConfigError: no class is named so.
    """
    for c in class_names:
        if c.lower() == "normal":
            return c
    raise ConfigError(f"no class named 'normal' among {', '.join(class_names)}: pass normal= to aggregate")


def aggregate(
    slices: Iterable[SliceResult | Mapping[str, Any]],
    class_names: Sequence[str],
    top_k: int = TOP_K,
    normal: str | None = None,
) -> list[StudyPrediction]:
    """Group slices by study and call each study (rule: the module docstring).

    Args:
        slices: per-slice results (:class:`SliceResult` objects or dicts), in any order.
        class_names: the model's classes, in its order.
        top_k: slices pooled per class (fewer in a smaller study).
        normal: the no-lesion class (default: the class named ``normal``).

    Returns:
        one :class:`StudyPrediction` per study, sorted by study key.

    Raises:
        ConfigError: ``top_k`` < 1, or no normal class.
        ValueError: a slice without a key, or without a probability for some class.
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    class_names = tuple(class_names)
    normal = normal_class(class_names) if normal is None else normal
    if normal not in class_names:
        raise ConfigError(f"normal class {normal!r} is not one of {', '.join(class_names)}")
    studies: dict[str, list[_Slice]] = {}
    for obj in slices:
        s = _read_slice(obj, class_names)
        studies.setdefault(s.study, []).append(s)
    return [_call_study(key, studies[key], class_names, top_k, normal) for key in sorted(studies)]


def _ranked(members: list[_Slice], c: str, lowest: bool) -> list[_Slice]:
    """``members`` by their probability of ``c`` (highest first, or lowest first), ties by key."""
    sign = 1.0 if lowest else -1.0
    return sorted(members, key=lambda s: (sign * s.probs[c], s.key, s.label))


def _call_study(key: str, members: list[_Slice], class_names: tuple[str, ...], top_k: int,
                normal: str) -> StudyPrediction:
    k = min(top_k, len(members))
    pooled = {c: _ranked(members, c, lowest=(c == normal))[:k] for c in class_names}
    scores = {c: math.fsum(s.probs[c] for s in pooled[c]) / k for c in class_names}
    votes = {c: sum(s.class_name == c for s in members) for c in class_names}
    order = {c: i for i, c in enumerate(class_names)}
    call = min(class_names, key=lambda c: (-scores[c], -votes[c], order[c]))
    if len(members) == 1:
        probs = dict(members[0].probs)  # already sums to 1: reported as the slice's, unchanged
    else:
        total = math.fsum(scores.values())
        probs = {c: round(v / total, 6) if total > 0 else round(1 / len(class_names), 6) for c, v in scores.items()}
    return StudyPrediction(
        study=key,
        series=sorted({s.series for s in members}),
        n_slices=len(members),
        class_name=call,
        class_index=order[call],
        probs=probs,
        scores={c: round(v, 6) for c, v in scores.items()},
        rule=f"{RULE} k={k}",
        driving=[DrivingSlice(s.label, s.key, s.probs[call], s.position) for s in pooled[call]],
    )


CSV_COLUMNS = ("study", "class", "class_index", "n_slices", "series", "rule", "driving")


class StudyWriter:
    """Writes study predictions as JSON lines (``.jsonl``), CSV (``.csv``) or Parquet (``.parquet``,
    :mod:`ctmask.runtime.parquet`), atomically.

    Records go to a temporary file as they come; leaving the ``with`` block renames it
    onto the target, and an exception inside it leaves no file behind (an existing one is
    untouched). CSV columns: ``study, class, class_index, prob_<class>..., n_slices, series,
    rule, driving``; ``series`` and ``driving`` are JSON lists (``driving``: ``[label, prob]``
    pairs). The CSV class columns come from ``class_names``, else from the first record.
    """

    def __init__(self, path: str | Path, class_names: Sequence[str] | None = None):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".csv", ".parquet"):
            raise ConfigError(f"cannot tell the output format from {self.path.name!r}: use .jsonl, .csv or .parquet")
        self.format = suffix[1:]
        self.class_names: tuple[str, ...] | None = None if class_names is None else tuple(class_names)
        self.count = 0
        self._ctx = atomic_path(self.path)
        self._fh: io.TextIOWrapper | None = None
        self._csv: Any = None
        self._rows: list[dict] = []
        self._open = False

    def __enter__(self) -> StudyWriter:
        tmp = self._ctx.__enter__()
        self._tmp, self._open = tmp, True
        if self.format == "parquet":
            return self
        self._fh = open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")
        if self.format == "csv":
            self._csv = csv.writer(self._fh)
            if self.class_names is not None:
                self._header()
        return self

    def _header(self) -> None:
        names = self.class_names or ()
        self._csv.writerow([*CSV_COLUMNS[:3], *(f"prob_{c}" for c in names), *CSV_COLUMNS[3:]])

    def write(self, study: StudyPrediction) -> None:
        """Append one study.

        Raises:
            DataError: it cannot be written (disk full ...), naming the output file.
        """
        try:
            self._write(study)
        except OSError as exc:
            raise output_error(exc, self.path) from None

    def _write(self, study: StudyPrediction) -> None:
        if not self._open:
            raise RuntimeError("StudyWriter.write outside its with-block")
        if self.format == "parquet":
            if self.class_names is None:
                self.class_names = tuple(study.probs)
            self._rows.append(study.to_dict())
        elif self.format == "jsonl":
            self._fh.write(json.dumps(study.to_dict()) + "\n")
        else:
            if self.class_names is None:
                self.class_names = tuple(study.probs)
                self._header()
            driving = [[d.label, round(d.prob, 6)] for d in study.driving]
            self._csv.writerow(safe_row([study.study, study.class_name, study.class_index,  # no formula cells
                                         *(study.probs[c] for c in self.class_names), study.n_slices,
                                         json.dumps(study.series), study.rule, json.dumps(driving)]))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._open = False

        def finish() -> None:
            if self.format == "parquet":
                if exc_type is None:
                    from ctmask.runtime.parquet import write_studies

                    write_studies(self._tmp, self._rows, self.class_names or ())
                return
            assert self._fh is not None
            if exc_type is None and self.format == "csv" and self.class_names is None:
                self.class_names = ()
                self._header()
            self._fh.close()
            self._fh = None

        close_atomic(self._ctx, self.path, finish, exc_type, exc, tb)
