"""The Comprehensive 3D SR, TID 1500 measurement report of one study (highdicom).

The report's observation context is the device ``ctmask``, its procedure reported CT chest,
its Image Library (TID 1600) the source images it references (where they carry their pixel
spacing, orientation and position). Content, in the order of the report's imaging measurements:

1. the study-level call: a TID 1501 measurement group whose *finding* (DCM 121071) is the called class,
   with its probability and the algorithm (TID 4019) whose parameters name the rule that made
   the call (``rule topk-mean/1 k=5``), tracking identifier ``study call``;
2. for each slice that drove the call (most decisive first): a TID 1501 group referencing
   the source instance, the slice's own call as *finding* and its probability, tracking
   identifier ``slice call <n>``;
3. for each shown lesion detection (:func:`ctmask.runtime.overlays.shown_detections`): a TID
   1410 planar region, the box as a closed polyline in the source image's pixel frame
   (columns, rows; pixel edges at integers), the lesion class as finding type and the score as
   its probability, tracking identifier ``<lesion> <slice>.<rank>``.
"""

from __future__ import annotations

import numpy as np

from ctmask.runtime.dicom_out.codes import code
from ctmask.runtime.dicom_out.context import Algorithm, SourceSlice


def box_polyline(box: list[float] | tuple[float, ...]) -> np.ndarray:
    """The box ``(x1, y1, x2, y2)`` as a closed polyline of 5 (column, row) points."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], np.float32)


def _probability(value: float, algorithm_id):
    import highdicom as hd

    return hd.sr.Measurement(name=code("probability"), value=float(value), unit=code("no units"),
                             algorithm_id=algorithm_id)


def _tracking(algorithm: Algorithm, identifier: str, *parts: str):
    import highdicom as hd

    return hd.sr.TrackingIdentifier(uid=algorithm.uid("tracking", identifier, *parts), identifier=identifier)


def study_group(study: dict, algorithm: Algorithm, study_uid: str):
    """TID 1501: the study's call, its probability and the rule."""
    import highdicom as hd

    call = str(study["class"])
    algo = algorithm.identification(str(study.get("rule", "")))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(algorithm, "study call", study_uid),
        finding_type=code(call), algorithm_id=algo, finding_sites=[hd.sr.FindingSite(code("finding site"))],
        measurements=[_probability(study["probs"][call], algo)])


def slice_group(source: SourceSlice, n: int, algorithm: Algorithm):
    """TID 1501: one driving slice's own call and probability, referencing its instance."""
    import highdicom as hd

    call = str(source.record["class"])
    algo = algorithm.identification()
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(algorithm, f"slice call {n}", source.uid),
        finding_type=code(call), algorithm_id=algo,
        measurements=[_probability(source.record["probs"][call], algo)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source.dataset)])


def region_groups(source: SourceSlice, n: int, algorithm: Algorithm) -> list:
    """TID 1410: one planar region per shown detection of ``source``."""
    import highdicom as hd

    ds = source.dataset
    image = hd.sr.SourceImageForRegion(str(ds.SOPClassUID), str(ds.SOPInstanceUID))  # type: ignore[attr-defined]
    algo = algorithm.identification()
    groups = []
    for rank, det in enumerate(source.detections, 1):
        region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                   graphic_data=box_polyline(det["box"]), source_image=image)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(algorithm, f"{det['lesion']} {n}.{rank}", source.uid),
            referenced_region=region, finding_type=code(str(det["lesion"])), algorithm_id=algo,
            measurements=[_probability(det["score"], algo)]))
    return groups


LIBRARY_GEOMETRY = ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")
"""What highdicom's TID 1604 descriptors read from each cross-sectional image of the library."""


def library(evidence: list) -> list | None:
    """The images of the TID 1600 Image Library (TID 1500 row 5, mandatory): the evidence, or
    None where an image lacks the geometry its TID 1604 descriptors need (no Pixel Spacing: the
    report is still made, without the library)."""
    if all(all(k in ds for k in LIBRARY_GEOMETRY) for ds in evidence):
        return evidence
    return None


def build_sr(study: dict, driving: list[SourceSlice], boxed: list[SourceSlice], algorithm: Algorithm,
             series_uid: str, sop_uid: str, series_description: str):
    """The study's Comprehensive 3D SR (TID 1500).

    Args:
        study: the study record (``ctmask.runtime.study.StudyPrediction.to_dict``).
        driving: the slices that drove the call, most decisive first.
        boxed: the slices whose shown detections become planar regions (numbered in order).
        series_uid / sop_uid: the SR's own UIDs.
    """
    import highdicom as hd

    device = hd.sr.ObserverContext(
        observer_type=code("device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.uid("device"), name="ctmask", manufacturer_name="ctmask",
            model_name=f"COVID-CT-Mask-Net ({algorithm.head} head, {algorithm.precision})"))
    groups = [study_group(study, algorithm, str(study["study"]))]
    groups += [slice_group(s, n, algorithm) for n, s in enumerate(driving, 1)]
    for n, s in enumerate(boxed, 1):
        groups += region_groups(s, n, algorithm)
    evidence = list({s.uid: s.dataset for s in [*driving, *boxed]}.values())
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=code("procedure"), imaging_measurements=groups,
                                     referenced_images=library(evidence))
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=9901,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer="ctmask", is_complete=True,
        contributing_equipment=[algorithm.equipment()], series_description=series_description)
