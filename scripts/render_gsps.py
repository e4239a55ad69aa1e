"""Draw a Grayscale Softcopy Presentation State over the images it references, as PNGs.

    python scripts/render_gsps.py GSPS.dcm SOURCE_FOLDER OUT_FOLDER

An independent reading of what ``infer --dicom-out`` wrote (pydicom and Pillow only, none of
ctmask's drawing code): each referenced source image (found by SOPInstanceUID under
SOURCE_FOLDER) is put through its modality LUT and the presentation's VOI LUT (window), and
every PIXEL-unit polyline and text object of its graphic annotations is drawn on it.
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


def render(gsps_path: Path, source_folder: Path, out: Path) -> list[Path]:
    pr = pydicom.dcmread(gsps_path)
    voi = pr.SoftcopyVOILUTSequence[0]
    center, width = float(voi.WindowCenter), float(voi.WindowWidth)
    sources = _sources(source_folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for ann in pr.GraphicAnnotationSequence:
        uid = str(ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        img = _windowed(pydicom.dcmread(sources[uid]), center, width)
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
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    for p in render(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])):
        print(p)
