"""Evaluation metrics of slice classification (paper Table 2), used by the runtime and training.

Numpy only (this module is part of ``ctmask.core`` and never imports torch).

Per-class sensitivity (recall) and precision, overall accuracy and the confusion matrix of
the slice classifier S (:func:`classification_report`, :func:`format_classification_table`).
The detector's segmentation metrics are in :mod:`ctmask.training.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ctmask.core.presets import CLASS_NAMES

# ---------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------


def _preview(values: np.ndarray, limit: int = 10) -> str:
    """Short text of the first ``limit`` values of a 1-D array."""
    items = [repr(v.item() if hasattr(v, "item") else v) for v in values[:limit]]
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return "[" + ", ".join(items) + more + "]"


def _as_labels(values, name: str, n_classes: int) -> np.ndarray:
    """Validate a 1-D sequence of class indices and return it as int64.

    Raises:
        ValueError: not 1-D, not integer-valued, or outside ``[0, n_classes)``; the
            message names the offending values and their positions.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            pos = np.flatnonzero(bad)
            raise ValueError(
                f"{name} must hold integer class indices; non-integer values "
                f"{_preview(arr[pos])} at positions {_preview(pos)}"
            )
    labels = arr.astype(np.int64)
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        pos = np.flatnonzero(bad)
        raise ValueError(
            f"{name} has labels outside [0, {n_classes - 1}]: values "
            f"{_preview(np.unique(labels[pos]))} at positions {_preview(pos)}"
        )
    return labels


def classification_report(y_true, y_pred, class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """Per-class sensitivity / precision, accuracy and confusion matrix (paper Table 2).

    Args:
        y_true: true class indices, int array-like [n] with values in
            ``[0, len(class_names))`` (integral floats are accepted).
        y_pred: predicted class indices, int array-like [n], same range.
        class_names: names of the classes in index order; default
            :data:`~ctmask.core.presets.CLASS_NAMES` (normal, pneumonia, covid19).

    Returns:
        dict with plain Python values (JSON-serialisable):

        * ``n`` (int): number of samples.
        * ``accuracy`` (float): fraction of correct predictions in [0, 1].
        * ``per_class`` (dict name -> dict): ``sensitivity`` (recall, TP / support),
          ``precision`` (TP / predicted), ``support`` (int, true samples of the class),
          ``predicted`` (int, samples predicted as the class). A class that is never
          predicted has precision 0.0 (not NaN); a class with no true sample has
          sensitivity 0.0. ``support`` and ``predicted`` tell these cases apart.
        * ``confusion_matrix`` (list of lists of int) [C][C]: rows = true class,
          columns = predicted class.
        * ``class_names`` (list of str).

    Raises:
        ValueError: inputs of different lengths, empty inputs, not 1-D, non-integer
            labels or labels out of range (the message shows the offending values).
    """
    names = [str(c) for c in class_names]
    n_classes = len(names)
    if n_classes == 0:
        raise ValueError("class_names is empty")
    if len(set(names)) != n_classes:
        raise ValueError(f"class_names has duplicates: {names}")
    t = _as_labels(y_true, "y_true", n_classes)
    p = _as_labels(y_pred, "y_pred", n_classes)
    if t.shape[0] != p.shape[0]:
        raise ValueError(
            f"y_true and y_pred have different lengths: {t.shape[0]} != {p.shape[0]}"
        )
    if t.shape[0] == 0:
        raise ValueError("y_true and y_pred are empty; nothing to evaluate")

    cm = np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    per_class = {}
    for i, name in enumerate(names):
        per_class[name] = {
            "sensitivity": float(tp[i] / support[i]) if support[i] > 0 else 0.0,
            "precision": float(tp[i] / predicted[i]) if predicted[i] > 0 else 0.0,
            "support": int(support[i]),
            "predicted": int(predicted[i]),
        }
    n = int(t.shape[0])
    return {
        "n": n,
        "accuracy": float(tp.sum() / n),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "class_names": names,
    }


def text_table(header: list[str], rows: list[list[str]], left_cols: int = 1) -> list[str]:
    """Monospace-align a table; the first ``left_cols`` columns are left-aligned."""
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = [
            c.ljust(w) if j < left_cols else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(["-" * w for w in widths]))
    return [fmt(header), rule, *(fmt(r) for r in rows)]


def format_classification_table(report: Mapping) -> str:
    """Render a :func:`classification_report` as the paper's Table 2 in plain text.

    Args:
        report: dict returned by :func:`classification_report`.

    Returns:
        Multi-line monospace text: one row per class with sensitivity % and precision %
        (2 decimals) and support, then the overall accuracy %, then the confusion matrix
        with labelled rows (true class) and columns (predicted class).
    """
    names = list(report["class_names"])
    rows = []
    for name in names:
        pc = report["per_class"][name]
        rows.append(
            [
                name,
                f"{100.0 * pc['sensitivity']:.2f}",
                f"{100.0 * pc['precision']:.2f}",
                str(pc["support"]),
            ]
        )
    lines = text_table(["class", "sensitivity %", "precision %", "support"], rows)
    lines.append("")
    lines.append(f"overall accuracy: {100.0 * report['accuracy']:.2f} %  (n = {report['n']})")
    lines.append("")
    lines.append("confusion matrix (rows = true class, columns = predicted class)")
    cm = report["confusion_matrix"]
    cm_rows = [[name, *(str(v) for v in cm[i])] for i, name in enumerate(names)]
    lines.extend(text_table(["true \\ pred", *names], cm_rows))
    return "\n".join(lines) + "\n"
