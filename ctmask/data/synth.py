"""Synthetic chest-CT benchmark in the COVIDx-CT and CNCB formats.

The real data sets cannot be downloaded here, so this module simulates them: 512 x 512
axial slices computed in Hounsfield units and rendered with the lung window, each with a
lesion mask, written as COVIDx-CT split files plus a CNCB-style segmentation layout::

    OUT/images/{split}_{i:05d}.png                 uint8 lung-window rendering
    OUT/{train,val,test}_COVIDx_CT.txt             "filename class xmin ymin xmax ymax"
    OUT/segmentation/{split}/images/NAME.png       hard link to OUT/images/NAME.png
    OUT/segmentation/{split}/masks/NAME.png        uint8, 0 bg, 1 lung, 2 GGO, 3 consolidation
    OUT/synth.json                                 seed, counts, version, description

Every slice draws from its own ``np.random.default_rng([seed, index])``, so the output
is identical for any number of worker processes. Drawing code lives in
``synth_shapes`` (primitives), ``synth_anatomy`` (normal chest) and ``synth_lesions``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from scipy import ndimage

from ctmask.core.errors import DataError
from ctmask.core.fileio import atomic_path, write_json_atomic
from ctmask.core.preprocess import window_hu
from ctmask.core.presets import CLASS_NAMES
from ctmask.data.covidx import write_split
from ctmask.data.synth_anatomy import build_anatomy
from ctmask.data.synth_lesions import LesionCanvas, draw_covid, draw_pneumonia
from ctmask.data.synth_shapes import SIZE

GENERATOR = "ctmask.data.synth"
GENERATOR_VERSION = "1.0"
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FILE = "{split}_COVIDx_CT.txt"
_NAME_RE = re.compile(r"^(train|val|test)_\d{5}\.png$")

DESCRIPTION = (
    "This is a SYNTHETIC data set, not patient data: every slice is simulated by "
    "ctmask.data.synth to stand in for COVIDx-CT (slice classes) and the CNCB lesion "
    "segmentation set, which cannot be downloaded here. Each 512x512 axial chest slice is "
    "computed in Hounsfield units and rendered with the lung window (level -600, width "
    "1500): an elliptical body of soft tissue (+40 HU) with a subcutaneous fat layer "
    "(-100 HU) in air (-1000 HU), two lungs (parenchyma about -860 HU with smooth "
    "variation and posterior dependent density) cut by the mediastinum, heart, aorta and "
    "spine, branching pulmonary vessels denser near the hila, bronchi, ribs, sternum and a "
    "vertebra with cortical bone (+650..+800 HU), a patient table, per-slice HU offset/"
    "scale jitter and white plus correlated scanner noise. Lesions are ground-glass "
    "opacities (hazy, -680..-420 HU, soft edges, vessels visible through them) and "
    "consolidations (-100..+40 HU, sharp edges, optional air bronchograms), always inside "
    "the lungs. COVID-19 slices show bilateral, subpleural, multifocal GGO (2-7 patches) "
    "with small consolidations in about 30%; common-pneumonia slices show one large "
    "unilateral lobar or segmental consolidation, with a GGO halo in about 50%; normal "
    "slices have no lesion; about 5% of lesion slices are atypical so the classes overlap. "
    "It exercises the full pipeline and gives meaningful relative numbers, but accuracy on "
    "it says nothing about clinical performance."
)


@dataclass
class SynthSlice:
    """One synthetic slice.

    Attributes:
        hu: float32 [512, 512] Hounsfield units (noise included).
        image: uint8 [512, 512] lung-window rendering (0 = -1350 HU, 255 = +150 HU).
        mask: uint8 [512, 512] 0 background, 1 lung field, 2 GGO, 3 consolidation.
        body_box: (xmin, ymin, xmax, ymax) body crop, int pixels, max exclusive.
        label: slice class, 0 normal, 1 common pneumonia, 2 COVID-19.
    """

    hu: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    body_box: tuple[int, int, int, int]
    label: int


def _scanner(rng: np.random.Generator, hu: np.ndarray) -> np.ndarray:
    """Per-slice calibration jitter plus white and spatially correlated noise (float32)."""
    scale, offset = rng.uniform(0.97, 1.03), rng.normal(0.0, 12.0)
    white = rng.standard_normal(hu.shape, dtype=np.float32) * rng.uniform(10.0, 22.0)
    half = rng.standard_normal((hu.shape[0] // 2, hu.shape[1] // 2), dtype=np.float32)
    corr = np.asarray(Image.fromarray(half, mode="F").resize(hu.shape[::-1], Image.BILINEAR))
    out = hu * np.float32(scale) + np.float32(offset) + white + corr * np.float32(rng.uniform(8.0, 18.0))
    return np.clip(out, -1024.0, 3071.0).astype(np.float32)


def generate_slice(seed: int, index: int, label: int) -> SynthSlice:
    """Simulate one slice; the same (seed, index, label) always gives the same arrays.

    Args:
        seed: data-set seed.
        index: slice number within the data set (any int >= 0).
        label: 0 normal, 1 common pneumonia, 2 COVID-19.
    """
    if label not in (0, 1, 2):
        raise ValueError(f"label must be 0, 1 or 2, got {label!r}")
    rng = np.random.default_rng([int(seed), int(index)])
    anat = build_anatomy(rng)
    canvas = LesionCanvas(anat, rng)
    if label == 2:
        draw_covid(rng, canvas)
    elif label == 1:
        draw_pneumonia(rng, canvas)
    hu = _scanner(rng, canvas.render(anat.hu))
    image = np.round(window_hu(hu) * 255.0).astype(np.uint8)
    return SynthSlice(hu=hu, image=image, mask=canvas.label_mask(), body_box=anat.body_box, label=label)


# ----------------------------------------------------------------------------- writing


def _save_png(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=3)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a hard link to ``src`` (a copy where links are impossible)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_one(task: tuple[str, str, int, int, int]) -> tuple[str, str, int, tuple, int, int]:
    """Generate and write one slice; returns (split, name, label, box, n_ggo, n_cons)."""
    out, split, index, seed, label = task
    out = Path(out)
    s = generate_slice(seed, index, label)
    name = f"{split}_{index:05d}.png"
    image_path = out / "images" / name
    _save_png(image_path, s.image)
    seg = out / "segmentation" / split
    _save_png(seg / "masks" / name, s.mask)
    (seg / "images").mkdir(parents=True, exist_ok=True)
    _link_or_copy(image_path, seg / "images" / name)
    eight = np.ones((3, 3), bool)
    n_ggo = ndimage.label(s.mask == 2, structure=eight)[1]
    n_cons = ndimage.label(s.mask == 3, structure=eight)[1]
    return split, name, label, s.body_box, int(n_ggo), int(n_cons)


T = TypeVar("T")


def run_tasks(fn: Callable[[Any], T], tasks: list, workers: int | None,
              progress: Callable[[int, int], None] | None = None, max_chunk: int = 1) -> list[T]:
    """``[fn(t) for t in tasks]`` on ``workers`` processes (default: all cores; forked where
    possible), in order, calling ``progress(done, total)`` as results arrive."""
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    workers = min(workers, len(tasks)) or 1
    results: list[T] = []

    def collect(items) -> None:
        for res in items:
            results.append(res)
            if progress:
                progress(len(results), len(tasks))

    if workers == 1:
        collect(fn(t) for t in tasks)
        return results
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers) as pool:
        collect(pool.imap(fn, tasks, chunksize=max(1, min(max_chunk, len(tasks) // (4 * workers)))))
    return results


def _check_out_dir(out: Path) -> None:
    """Allow a missing/empty folder or a previous synth output; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a folder", out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    meta = out / "synth.json"
    try:
        ok = json.loads(meta.read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise DataError("refusing to write into a non-empty folder that is not a synth output", out,
                        hint="choose a new or empty folder")


def _split_sizes(n: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    n_train = int(round(n * fractions[0]))
    n_val = min(int(round(n * fractions[1])), n - n_train)
    return {"train": n_train, "val": n_val, "test": n - n_train - n_val}


def _plan(n_slices: int, seed: int, fractions) -> list[tuple[str, int, int]]:
    """(split, global index, label) per slice; classes balanced round-robin, then shuffled."""
    plan, start = [], 0
    for k, (split, n) in enumerate(_split_sizes(n_slices, fractions).items()):
        labels = np.arange(n) % len(CLASS_NAMES)
        np.random.default_rng([int(seed), 7919, k]).shuffle(labels)
        plan += [(split, start + i, int(labels[i])) for i in range(n)]
        start += n
    return plan


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete slices of an earlier, larger run (only files with our own naming pattern)."""
    folders = [out / "images"] + [out / "segmentation" / s / sub for s in SPLITS for sub in ("images", "masks")]
    for folder in folders:
        if folder.is_dir():
            for p in folder.iterdir():
                if _NAME_RE.match(p.name) and p.name not in keep:
                    p.unlink()


def synthesize(
    out_dir: str | Path,
    n_slices: int,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25),
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write a synthetic benchmark of ``n_slices`` slices to ``out_dir``.

    Args:
        out_dir: new or empty folder, or the output of an earlier call (it is overwritten).
        n_slices: total number of slices (>= 1), split train/val/test by ``fractions``.
        seed: data-set seed; the output depends only on (seed, n_slices, fractions).
        fractions: train, val, test shares (sum 1).
        workers: processes; None = ``os.cpu_count()``, 1 = run inline.
        progress: optional ``callable(n_done, n_total)`` called after every slice.

    Returns:
        The summary also written to ``synth.json`` (seed, counts per split and class,
        lesion instance counts, generator version, description) plus ``out_dir``.

    Raises:
        DataError: ``out_dir`` is non-empty and not an earlier synth output.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    out = Path(out_dir)
    _check_out_dir(out)
    plan = _plan(n_slices, seed, fractions)
    out.mkdir(parents=True, exist_ok=True)
    header = {"generator": GENERATOR, "version": GENERATOR_VERSION, "status": "writing", "seed": int(seed)}
    write_json_atomic(out / "synth.json", header)  # marks the folder as ours even if we crash

    tasks = [(str(out), split, index, int(seed), label) for split, index, label in plan]
    results = run_tasks(_write_one, tasks, workers, progress, max_chunk=8)
    _remove_stale(out, {r[1] for r in results})

    splits = {}
    for split in SPLITS:
        rows = [r for r in results if r[0] == split]
        write_split(out / SPLIT_FILE.format(split=split), [(r[1], r[2], r[3]) for r in rows])
        splits[split] = {
            "file": SPLIT_FILE.format(split=split),
            "n": len(rows),
            "classes": {c: sum(r[2] == k for r in rows) for k, c in enumerate(CLASS_NAMES)},
            "instances": {"ggo": sum(r[4] for r in rows), "consolidation": sum(r[5] for r in rows)},
        }
    summary = {**header, "status": "complete", "n_slices": n_slices, "image_size": SIZE,
               "fractions": list(fractions), "splits": splits, "description": DESCRIPTION}
    write_json_atomic(out / "synth.json", summary)
    return {**summary, "out_dir": str(out)}
