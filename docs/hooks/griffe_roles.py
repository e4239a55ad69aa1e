"""Griffe extension for the API reference: Sphinx cross-reference roles in ctmask's docstrings.

ctmask's docstrings are Google style (``Args:``, ``Returns:``, ``Raises:``) but name other objects
with Sphinx roles (:class:`CtmaskError`, :func:`~ctmask.exporter.onnx_export.export_onnx`), which
Markdown would show as raw text. Each role becomes an optional autorefs cross-reference: a link
when its target is documented on the site, else the name in code, never a warning.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|attr|mod|exc|obj|const):`(~?)([\w.]+)(\(\))?`")


def _target(obj: griffe.Object, name: str) -> str | None:
    """The full path ``name`` resolves to in ``obj``'s scope (then its parents'), else None."""
    if name.startswith("ctmask."):
        return name
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            return scope.resolve(name)
        except Exception:  # griffe.NameResolutionError, or an alias that cannot be followed
            scope = scope.parent
    return None


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None or ":`" not in obj.docstring.value:
            return

        def link(m: re.Match[str]) -> str:
            tilde, name, call = m.groups()
            title = (name.rsplit(".", 1)[-1] if tilde else name) + (call or "")
            path = _target(obj, name)
            code = f"<code>{html.escape(title)}</code>"
            if path is None:
                return code
            return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
