"""PACS connectivity: studies pulled by DICOMweb (``infer --dicomweb``) or received by DIMSE
(``listen``), predicted, and their results stored back, through a spool that keeps them until
the PACS has them. Torch-free."""
