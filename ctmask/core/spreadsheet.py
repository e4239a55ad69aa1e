"""CSV cells a spreadsheet shows as text, never evaluates (OWASP's CSV injection rule).

A file name like ``=1+2.png`` or a DICOM UID like ``=HYPERLINK("http://...")`` written verbatim
into a CSV is a formula to Excel, LibreOffice and Google Sheets. Every text cell that starts
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return, also after leading whitespace (``" =1+2"``:
spreadsheets skip the spaces), gets a single quote in front, which
spreadsheets read as "text follows". A text cell that already starts with a quote gets one more,
so :func:`restore_cell` gives back exactly the value written (``--resume`` reads CSV outputs
back). Numbers are written by ctmask itself and stay numbers. JSONL and Parquet hold the exact
values.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet evaluate or reinterpret a cell."""
QUOTE = "'"


def safe_cell(value: object) -> object:
    """``value`` as a CSV cell: a string that starts like a formula (after any leading whitespace)
    or with a quote, with a quote in front; anything else (numbers, ``None``) unchanged."""
    if isinstance(value, str) and (value.startswith((*FORMULA_STARTS, QUOTE))
                                   or value.lstrip().startswith(FORMULA_STARTS)):
        return QUOTE + value
    return value


def safe_row(row: list) -> list:
    """:func:`safe_cell` of every cell."""
    return [safe_cell(v) for v in row]


def restore_cell(text: str) -> str:
    """The value :func:`safe_cell` was given, from the cell it wrote."""
    return text[1:] if text.startswith(QUOTE) else text
