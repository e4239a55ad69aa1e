"""The Grayscale Softcopy Presentation State of one study (highdicom): the shown lesion
detections drawn over their source images, which stay untouched.

Each annotated image gets one graphic annotation on the layer ``CTMASK``: every detection as
a closed polyline in the image's pixel frame (PIXEL units, the same points as the SR's
regions), with its ``lesion score`` as a text object above the box, and a line ``ctmask:
NOT FOR CLINICAL USE`` in the top left corner of the display (DISPLAY units). The VOI LUT
is the model's lung window, so the viewer shows what the model saw.
"""

from __future__ import annotations

from ctmask.runtime.dicom_out.context import NOT_FOR_CLINICAL_USE, Algorithm, SourceSlice
from ctmask.runtime.dicom_out.sr import box_polyline

LAYER = "CTMASK"


def _label_box(box: list[float], rows: int, cols: int) -> tuple[float, float, float, float]:
    """Where a box's label goes: a strip above it (inside the image), as (x1, y1, x2, y2) in PIXEL units."""
    x1, y1, x2, _ = (float(v) for v in box)
    height = max(6.0, rows / 40.0)
    top = y1 - height if y1 - height >= 0 else min(y1, rows - height)
    width = max(x2 - x1, 8 * height)
    left = min(max(x1, 0.0), max(cols - width, 0.0))
    return (left, max(top, 0.0), min(left + width, float(cols)), min(max(top, 0.0) + height, float(rows)))


def annotation(source: SourceSlice, layer):
    """The graphic annotation of one source image: its shown detections and their labels."""
    import highdicom as hd

    ds = source.dataset
    rows, cols = int(ds.Rows), int(ds.Columns)  # type: ignore[attr-defined]
    graphics = [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, box_polyline(d["box"]),
                                    hd.pr.AnnotationUnitsValues.PIXEL) for d in source.detections]
    texts = [hd.pr.TextObject(f"{d['lesion']} {float(d['score']):.2f}", hd.pr.AnnotationUnitsValues.PIXEL,
                              bounding_box=_label_box(d["box"], rows, cols),
                              text_justification=hd.pr.TextJustificationValues.LEFT)
             for d in source.detections]
    texts.append(hd.pr.TextObject(f"ctmask: {NOT_FOR_CLINICAL_USE}", hd.pr.AnnotationUnitsValues.DISPLAY,
                                  bounding_box=(0.01, 0.01, 0.6, 0.05),
                                  text_justification=hd.pr.TextJustificationValues.LEFT))
    return hd.pr.GraphicAnnotation(referenced_images=[ds], graphic_layer=layer, graphic_objects=graphics or None,
                                   text_objects=texts)


def build_gsps(boxed: list[SourceSlice], algorithm: Algorithm, window: tuple[float, float], series_uid: str,
               sop_uid: str, series_description: str):
    """The study's GSPS over the images of ``boxed`` (each with its shown detections).

    Args:
        window: (level, width) in HU: the model's DICOM window, the presentation's VOI LUT.
    """
    import highdicom as hd

    from ctmask.runtime.dicom_out.context import body_part

    layer = hd.pr.GraphicLayer(layer_name=LAYER, order=1, description="ctmask lesion detections")
    images = [s.dataset for s in boxed]
    voi = hd.pr.SoftcopyVOILUTTransformation(window_center=float(window[0]), window_width=float(window[1]),
                                             window_explanation="ctmask lung window",
                                             referenced_images=hd.ReferencedImageSequence(images))
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images, series_instance_uid=series_uid, series_number=9902, sop_instance_uid=sop_uid,
        instance_number=1, manufacturer="ctmask", manufacturer_model_name="COVID-CT-Mask-Net",
        software_versions=algorithm.software_versions(),  # type: ignore[arg-type]
        device_serial_number=algorithm.model_sha256,
        content_label="CTMASK_LESIONS", content_description=NOT_FOR_CLINICAL_USE[:64],
        graphic_annotations=[annotation(s, layer) for s in boxed], graphic_layers=[layer],
        voi_lut_transformations=[voi], contributing_equipment=[algorithm.equipment()],
        series_description=series_description)
    gsps.BodyPartExamined = body_part(images[0])
    return gsps
