"""DICOM result objects of an ``infer`` run, written with highdicom (torch-free).

Per study read from DICOM: a Comprehensive 3D SR TID 1500 measurement report
(:mod:`.sr`), a Grayscale Softcopy Presentation State drawing the lesion detections on the
source images (:mod:`.gsps`) and, optionally, Secondary Captures of the overlays (:mod:`.sc`);
all in the source study, each kind in a series of its own, the algorithm identified and
marked not for clinical use (:mod:`.context`), coded concepts from one table (:mod:`.codes`),
written by :func:`~.writer.write_dicom_results` (see docs/dicom.md).
"""

from ctmask.core.errors import ConfigError
from ctmask.runtime.dicom_out.writer import DicomOptions, StudyObjects, write_dicom_results

__all__ = ["DicomOptions", "StudyObjects", "require_highdicom", "write_dicom_results"]


def require_highdicom() -> None:
    """Raise :class:`ConfigError` saying what to install when highdicom is missing (checked
    before a ``--dicom-out`` run predicts anything)."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise ConfigError("--dicom-out writes its objects with highdicom, which is not installed",
                          hint="pip install 'ctmask[dicom]'") from None
