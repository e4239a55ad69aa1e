"""PACS connectivity: studies pulled by DICOMweb (``infer --dicomweb``) or received by DIMSE
(``listen``), predicted, and their results stored back, through a spool that keeps them until
the PACS has them. Torch-free."""

import re

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(text: str) -> bool:
    """``text`` is a DICOM UID (digits and dots, at most 64 characters): safe in a file name and a
    URL path (never ``..``, a slash, a query)."""
    return len(text) <= 64 and bool(_UID.match(text))
