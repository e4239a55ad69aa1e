"""Evaluation of an exported graph (any precision, no torch): paper Table 2 and the noise floor.

``ctmask evaluate GRAPH --split SPLIT`` decodes the split's slices as the runtime does, runs
the graph on them, and runs it again on the same slices with seeded input noise of +-0.25
and +-1 gray level (:mod:`ctmask.core.noise`): the calls that noise changes are the graph's
noise floor, the figure a reduced-precision graph's agreement is read against.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ctmask.core.errors import ConfigError
from ctmask.core.metrics import classification_report
from ctmask.core.noise import NOISE_GRAY_LEVELS, NoiseFloor
from ctmask.core.spec import INPUT
from ctmask.data.covidx import SplitEntry
from ctmask.runtime.predict import CropBoxes
from ctmask.runtime.runner import Runner
from ctmask.scans.batch import load_batch


def evaluate_graph(runner: Runner, entries: list[SplitEntry], split_file: str | Path, batch_size: int = 8,
                   noise_levels: tuple[float, ...] = NOISE_GRAY_LEVELS,
                   on_batch: Callable[[int], None] | None = None) -> dict:
    """Classify every slice of a split with an (activated) runner; report as ``evaluate`` does.

    Args:
        runner: an activated runner of a ctmask graph.
        entries: the split's slices (:func:`ctmask.data.covidx.read_split`).
        split_file: the split file (crop boxes for a graph trained on cropped slices).
        batch_size: slices per inference call.
        noise_levels: input-noise amplitudes of the noise floor, in gray levels; ``()`` skips it.
        on_batch: progress callback, called with the slices done in each batch.

    Returns:
        :func:`ctmask.core.metrics.classification_report` plus ``noise_floor``, ``head``,
        ``precision``, ``skipped`` (slices that could not be decoded: file and reason) and
        ``predictions``.

    Raises:
        ConfigError: ``batch_size`` < 1, or no slice of the split could be decoded.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be an integer >= 1, got {batch_size!r}")
    spec = runner.spec
    boxes = CropBoxes.from_split(split_file) if spec.crop else None
    floor = NoiseFloor(noise_levels)
    labels, preds, probs, files, skipped = [], [], [], [], []
    for start in range(0, len(entries), batch_size):
        chunk = entries[start:start + batch_size]
        loaded = load_batch([e.path for e in chunk], spec, boxes)
        images, ok, bad = loaded.batch, loaded.paths, loaded.failures
        skipped += [{"file": f.file, "error": f.reason} for f in bad]
        if ok:
            out = runner.infer({INPUT: images})
            # load_batch keeps the order of the paths it decodes; a path decodes or fails the
            # same way every time, so the entries that decoded are the chunk's minus the failed
            # ones, in order (a slice listed twice keeps each line's own label).
            failed = {f.file for f in bad}
            labels += [e.label for e in chunk if str(e.path) not in failed]
            preds.append(out["logits"].argmax(-1))
            probs.append(out["probs"])
            files += [str(p) for p in ok]
            if noise_levels:
                floor.measure(lambda x: runner.infer({INPUT: np.ascontiguousarray(x)})["logits"], images,
                              out["logits"])
        if on_batch:
            on_batch(len(chunk))
    if not files:
        raise ConfigError("no slice of the split could be decoded: "
                          + "; ".join(f"{s['file']}: {s['error']}" for s in skipped[:5]))
    y_pred = np.concatenate(preds)
    report = classification_report(np.array(labels), y_pred)
    report.update(head=spec.head, precision=spec.precision, skipped=skipped)
    if noise_levels:
        report["noise_floor"] = floor.to_dict()
    report["predictions"] = [
        {"file": f, "label": int(y), "pred": int(p), "probs": [round(float(v), 6) for v in pr]}
        for f, y, p, pr in zip(files, labels, y_pred, np.concatenate(probs))]
    return report
