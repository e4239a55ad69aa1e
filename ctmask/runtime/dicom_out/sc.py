"""Secondary Capture of a slice's overlay (highdicom), for viewers without GSPS support.

The picture is :func:`ctmask.runtime.overlays.render_overlay` of the source slice as the model
read it (lung window), with its shown lesion detections, plus a footer line ``NOT FOR
CLINICAL USE``; RGB, 8 bits, the source's own pixel grid and spacing, Burned In Annotation
YES. The patient and study come from the source instance.
"""

from __future__ import annotations

import numpy as np

from ctmask.runtime.dicom_out.context import NOT_FOR_CLINICAL_USE, Algorithm, SourceSlice, body_part


def capture_pixels(source: SourceSlice, window: tuple[float, float], force_modality: bool = False) -> np.ndarray:
    """The overlay of ``source`` as uint8 RGB [H, W, 3] (the slice decoded again from its file,
    ``force_modality`` as the run read it).

    Raises:
        DataError: the source cannot be decoded again.
    """
    from PIL import ImageDraw, ImageFont

    from ctmask.runtime.overlays import render_overlay
    from ctmask.scans.decode import read_slice
    from ctmask.scans.types import SliceRef

    rec = source.record
    decoded = read_slice(SliceRef(str(rec["file"]), rec.get("frame")), window, force_modality=force_modality)
    shown = source.detections
    img = render_overlay(decoded.pixels, np.asarray([d["box"] for d in shown], np.float32).reshape(-1, 4),
                         np.asarray([d["score"] for d in shown], np.float32), str(rec["class"]), rec["probs"],
                         names=[str(d["lesion"]) for d in shown])
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, y0, x1, y1 = draw.textbbox((0, 0), NOT_FOR_CLINICAL_USE, font=font)
    w, h = img.size
    top = max(h - (y1 - y0) - 4, 0)
    draw.rectangle((0, top, min(x1 - x0 + 3, w - 1), h - 1), fill=(0, 0, 0))
    draw.text((2 - x0, top + 2 - y0), NOT_FOR_CLINICAL_USE, fill=(255, 255, 255), font=font)
    return np.asarray(img, np.uint8)


def patient_orientation(ds) -> tuple[str, str] | None:
    """Patient Orientation (row direction, column direction) from the source's Image Orientation
    (Patient): each direction's dominant LPS axis (L/R, P/A, H/F); None where it has none."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def axis(v: list[float]) -> str:
        k = int(np.argmax(np.abs(v)))
        return letters[k][int(v[k] > 0)]

    return axis([float(x) for x in iop[:3]]), axis([float(x) for x in iop[3:]])


def build_sc(source: SourceSlice, n: int, algorithm: Algorithm, window: tuple[float, float], series_uid: str,
             sop_uid: str, series_description: str, force_modality: bool = False):
    """The Secondary Capture of driving slice ``n`` (instance number ``n``).

    Raises:
        DataError: the slice cannot be decoded again (:func:`capture_pixels`).
    """
    import highdicom as hd

    ds = source.dataset
    spacing = getattr(ds, "PixelSpacing", None)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ds, pixel_array=capture_pixels(source, window, force_modality), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=9903,
        sop_instance_uid=sop_uid, instance_number=n, manufacturer="ctmask",
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        patient_orientation=patient_orientation(ds), transfer_syntax_uid="1.2.840.10008.1.2.1",
        contributing_equipment=[algorithm.equipment()])
    sc.SeriesDescription = series_description
    sc.BodyPartExamined = body_part(ds)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{NOT_FOR_CLINICAL_USE}; overlay of {ds.SOPInstanceUID}"  # type: ignore[attr-defined]
    return sc
