"""Draw a Grayscale Softcopy Presentation State over the images it references, as PNGs.

    python scripts/render_gsps.py GSPS.dcm SOURCE_FOLDER OUT_FOLDER [SYNTH_MANIFEST]

An independent reading of what ``infer --dicom-out`` wrote (pydicom and Pillow only, none of
ctmask's drawing code): each referenced source image (found by SOPInstanceUID under
SOURCE_FOLDER) is put through its modality LUT and the presentation's VOI LUT (window), and
every PIXEL-unit polyline (red) and text object (yellow) of its graphic annotations is drawn
on it. With the ``manifest.json`` of ``ctmask synth --dicom``, the true lesions of each slice
(the generator's label mask, redrawn from its seed and index) are outlined in green, so the
boxes can be judged against where the lesions are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw


def _sources(folder: Path) -> dict[str, Path]:
    found = {}
    for p in folder.rglob("*"):
        if p.is_file():
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                found[str(ds.SOPInstanceUID)] = p
            except Exception:  # not DICOM: not a source
                continue
    return found


def _windowed(ds, center: float, width: float) -> Image.Image:
    hu = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0))
    gray = np.clip((hu - (center - width / 2)) / width, 0, 1) * 255
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def _truth(manifest: Path | None) -> dict[str, np.ndarray]:
    """SOPInstanceUID -> the slice's lesion mask (synthetic patients only)."""
    if manifest is None:
        return {}
    import json

    from ctmask.data.synth import generate_slice

    m = json.loads(manifest.read_text())
    seed = int(m["parameters"]["seed"])
    return {s["SOPInstanceUID"]: (lambda s=s, p=p: generate_slice(seed, s["generator_index"], p["label"]).mask)
            for p in m["patients"] for s in p["slices"] if s["lesion_pixels"]}


def _outline(img: Image.Image, mask: np.ndarray) -> None:
    m = mask >= 2  # 2 GGO, 3 consolidation (1 is the lung field)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    px = img.load()
    for r, c in zip(*np.nonzero(edge)):
        px[int(c), int(r)] = (60, 220, 60)


def render(gsps_path: Path, source_folder: Path, out: Path, manifest: Path | None = None) -> list[Path]:
    pr = pydicom.dcmread(gsps_path)
    voi = pr.SoftcopyVOILUTSequence[0]
    center, width = float(voi.WindowCenter), float(voi.WindowWidth)
    sources = _sources(source_folder)
    truth = _truth(manifest)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for ann in pr.GraphicAnnotationSequence:
        uid = str(ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        img = _windowed(pydicom.dcmread(sources[uid]), center, width)
        if uid in truth:
            _outline(img, truth[uid]())
        draw = ImageDraw.Draw(img)
        for g in getattr(ann, "GraphicObjectSequence", []):
            pts = np.asarray(g.GraphicData, np.float64).reshape(-1, 2)
            draw.line([tuple(p) for p in pts], fill=(255, 40, 40), width=1)
        for t in getattr(ann, "TextObjectSequence", []):
            if t.BoundingBoxAnnotationUnits == "PIXEL":
                x0, y0 = (float(v) for v in t.BoundingBoxTopLeftHandCorner)
                draw.text((x0, y0), str(t.UnformattedTextValue), fill=(255, 230, 0))
        path = out / f"{uid}.png"
        img.save(path)
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    for p in render(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
                    Path(sys.argv[4]) if len(sys.argv) == 5 else None):
        print(p)
