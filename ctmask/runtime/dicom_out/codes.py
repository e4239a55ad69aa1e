"""Every coded concept the DICOM result objects use, in one table with its source.

The DCM, LOINC and UCUM codes, and SNOMED CT's *Lung* and *Normal*, are those of DICOM PS3.16
as pydicom's code dictionary (``pydicom.sr.codedict.codes``) holds them; the table is checked
against it (``tests/test_dicom_out.py``). The SNOMED CT disorders (COVID-19, pneumonia) and
*lung consolidation* are not in PS3.16's context groups: they are SNOMED CT International
concepts (IHTSDO browser); *ground glass opacity* is DICOM's own (CID 6102, thoracic findings).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.coding import Code


@dataclass(frozen=True)
class Concept:
    """A coded concept and where its code comes from."""

    code: Code
    source: str


_PS316 = "DICOM PS3.16 (pydicom.sr.codedict)"
_SNOMED = "SNOMED CT International (IHTSDO browser)"

CODES: dict[str, Concept] = {
    # The report and its parts (TID 1500 / 1501 / 1410).
    "procedure": Concept(Code("24627-2", "LN", "CT Chest Report"), _PS316),
    "finding": Concept(Code("121071", "DCM", "Finding"), _PS316),
    "probability": Concept(Code("122157", "DCM", "Probability"), _PS316),
    "no units": Concept(Code("1", "UCUM", "no units"), _PS316),
    "device": Concept(Code("121007", "DCM", "Device"), _PS316),
    "processing equipment": Concept(Code("109102", "DCM", "Processing Equipment"), _PS316),
    "finding site": Concept(Code("39607008", "SCT", "Lung"), _PS316),
    # Slice and study calls (the model's classes).
    "normal": Concept(Code("17621005", "SCT", "Normal"), _PS316),
    "pneumonia": Concept(Code("233604007", "SCT", "Pneumonia"), _SNOMED),
    # FSN "Disease caused by severe acute respiratory syndrome coronavirus 2 (disorder)": over the 64
    # characters of a Code Meaning; "COVID-19" is its SNOMED CT synonym.
    "covid19": Concept(Code("840539006", "SCT", "COVID-19"), _SNOMED),
    # Lesion detections (the detector's classes; "lesion" where the graph gives none).
    "GGO": Concept(Code("112120", "DCM", "Ground glass opacity"), _PS316),
    "consolidation": Concept(Code("95436008", "SCT", "Lung consolidation"), _SNOMED),
    "lesion": Concept(Code("52988006", "SCT", "Lesion"), _PS316),
}
"""ctmask's name of a concept -> its code and source (what ``docs/dicom.md`` shows)."""


def code(name: str) -> Code:
    """The code of ``name`` (a key of :data:`CODES`; class names in any case).

    Raises:
        KeyError: ctmask has no code for it (the caller says which class cannot be coded).
    """
    if name in CODES:
        return CODES[name].code
    lowered = {k.lower(): v for k, v in CODES.items()}
    return lowered[name.lower()].code
