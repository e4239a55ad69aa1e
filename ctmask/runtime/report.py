"""The HTML report of a prediction run: one self-contained file that can be mailed.

:func:`write_report` writes a single HTML page with inline CSS and no script, no font, no
link to anything outside it: class counts, the studies (call, normalised scores, the
slices that drove the call with their overlay thumbnails), every slice (in a collapsed
``<details>``), the skipped files and why, the model and its metadata, the command and its
timing. Overlay PNGs are shrunk with Pillow (longest side :data:`THUMB_PX`, PNG or JPEG,
whichever is smaller) and embedded as ``data:`` URIs, each once: the per-slice table links
to a thumbnail already shown with its study. An overlay that is missing or unreadable is
shown as the text "overlay missing", never as a broken image. Every string taken from the
inputs (file names, metadata, reasons) is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import shlex
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ctmask import __version__
from ctmask.core.fileio import sha256_file, write_bytes_atomic
from ctmask.runtime.study import RULE, StudyPrediction, _get  # the same field access as the aggregation

THUMB_PX = 256
"""Longest side, in pixels, of an embedded overlay thumbnail (shown :data:`SHOW_PX` wide)."""

SHOW_PX = 160
"""Width, in CSS pixels, at which thumbnails are shown."""

JPEG_QUALITY = 80

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232a;margin:24px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
.sub{color:#57606a;margin:0 0 16px}
table{border-collapse:collapse;margin:4px 0 12px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7;position:sticky;top:0}
tbody tr:nth-child(even){background:#fafbfc}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;color:#fff;background:#6e7781}
.c0{background:#1a7f37}.c1{background:#bf8700}.c2{background:#cf222e}
.called{font-weight:700}
figure{display:inline-block;margin:0 8px 8px 0;vertical-align:top;width:""" + str(SHOW_PX) + """px}
figure img{width:""" + str(SHOW_PX) + """px;height:auto;display:block;border:1px solid #d0d7de;background:#000}
figcaption{font-size:12px;color:#57606a;word-break:break-all}
.missing{display:inline-block;border:1px dashed #cf222e;color:#cf222e;padding:2px 6px;font-size:12px}
.bar{display:inline-block;height:10px;background:#8c959f;vertical-align:middle;margin-left:6px}
details>summary{cursor:pointer;font-size:18px;font-weight:600;margin:28px 0 8px}
.small{font-size:12px;color:#57606a}
"""


def e(value: Any) -> str:
    """``value`` as HTML-escaped text (quotes too: safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def thumbnail_data_uri(path: str | Path, max_px: int = THUMB_PX) -> str:
    """``path``'s image shrunk to ``max_px`` (longest side) as a ``data:`` URI, PNG or JPEG.

    Transparency is flattened onto black; 16-bit and float images are stretched to 8 bits.

    Raises:
        OSError: the file is missing or not an image Pillow reads.
    """
    with Image.open(path) as src:
        src.load()
        img: Image.Image = src
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(img, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            img = Image.fromarray(scaled.astype(np.uint8), "L")
        elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (0, 0, 0))
            img.paste(rgba, mask=rgba.getchannel("A"))
        elif img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img = img.copy()
    img.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    encoded = {"jpeg": _encode(img, "JPEG", quality=JPEG_QUALITY)}
    if img.getcolors(256) is not None:  # a flat drawing (few colours): PNG keeps its edges, and is often smaller
        encoded["png"] = _encode(img, "PNG")  # (not tried on textured images: slow, and several times larger)
    fmt = min(encoded, key=lambda f: len(encoded[f]))
    return f"data:image/{fmt};base64," + base64.b64encode(encoded[fmt]).decode("ascii")


def _encode(img: Image.Image, fmt: str, **opts: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **opts)
    return buf.getvalue()


def _thumbnails(paths: set[str]) -> dict[str, tuple[str | None, str]]:
    """Data URI (or None, and why) of each overlay path; two threads (Pillow releases the GIL)."""

    def one(path: str) -> tuple[str | None, str]:
        try:
            return thumbnail_data_uri(path), ""
        except FileNotFoundError:
            return None, "no such file"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return None, f"unreadable ({exc.__class__.__name__}: {exc})"

    ordered = sorted(paths)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ordered, pool.map(one, ordered)))


class _Overlays:
    """Thumbnails, each embedded once; later mentions link to the first."""

    def __init__(self, by_key: dict[str, Any]):
        self.by_key = {k: None if p is None else str(p) for k, p in by_key.items()}  # slice key -> overlay path
        self.uris = _thumbnails({p for p in self.by_key.values() if p is not None})
        self.shown: dict[str, str] = {}  # slice key -> anchor id of its embedded thumbnail

    def figure(self, key: str, label: str, caption: str) -> str:
        path = self.by_key.get(key)
        if key in self.shown:
            return f'<a href="#{self.shown[key]}">thumbnail above</a>'
        if path is None:
            return '<span class="missing" title="no overlay was written for this slice">overlay missing</span>'
        uri, why = self.uris[path]
        if uri is None:
            return f'<span class="missing" title="{e(path)}: {e(why)}">overlay missing</span>'
        anchor = f"ov{len(self.shown) + 1}"
        self.shown[key] = anchor
        return (f'<figure id="{anchor}"><img src="{uri}" alt="overlay of {e(label)}">'
                f"<figcaption>{caption}</figcaption></figure>")


def _class_names(model: Mapping[str, Any], slices: list[dict], studies: list[dict]) -> list[str]:
    names = model.get("class_names")
    meta = model.get("metadata") or {}
    if names is None and "ctmask.class_names" in meta:
        try:
            names = json.loads(meta["ctmask.class_names"])
        except (TypeError, ValueError):
            names = None
    if names is None:
        for rec in [*studies, *slices]:
            if rec["probs"]:
                names = list(rec["probs"])
                break
    return [str(n) for n in names or ()]


def _slice_view(rec: Any) -> dict:
    key = str(_get(rec, "key", "file", default=""))
    return {
        "key": key,
        "label": str(_get(rec, "label", default="") or key),
        "class": str(_get(rec, "class_name", "class", default="")),
        "probs": dict(_get(rec, "probs", default={})),
        "study": str(_get(rec, "study", default="") or key),
        "series": str(_get(rec, "series", default="")),
        "position": _get(rec, "position"),
        "overlay": _get(rec, "overlay"),
    }


def _study_view(rec: StudyPrediction | Mapping[str, Any]) -> dict:
    d = rec.to_dict() if isinstance(rec, StudyPrediction) else dict(rec)
    driving = []
    for item in d.get("driving") or ():
        if isinstance(item, Mapping):
            driving.append({k: item.get(k) for k in ("label", "key", "prob", "position")})
        else:
            label, key, prob, *rest = item
            driving.append({"label": label, "key": key, "prob": prob, "position": rest[0] if rest else None})
    return {
        "study": str(_get(d, "study", default="")),
        "class": str(_get(d, "class", "class_name", default="")),
        "probs": dict(d.get("probs") or {}),
        "scores": dict(d.get("scores") or {}),
        "n_slices": d.get("n_slices"),
        "series": [str(s) for s in d.get("series") or ()],
        "rule": str(d.get("rule") or ""),
        "driving": driving,
    }


def _badge(name: str, class_names: list[str]) -> str:
    css = f"c{class_names.index(name)}" if name in class_names and class_names.index(name) < 3 else ""
    return f'<span class="badge {css}">{e(name)}</span>'


def _prob_cells(probs: dict, class_names: list[str], called: str, scores: dict | None = None) -> str:
    cells = []
    for c in class_names:
        p = probs.get(c)
        if p is None:
            cells.append('<td class="num">&ndash;</td>')
            continue
        css = "num called" if c == called else "num"
        title = f' title="score {float(scores[c]):.4f}"' if scores and c in scores else ""
        width = max(0, min(60, round(float(p) * 60)))
        cells.append(f'<td class="{css}"{title}>{float(p):.3f}<span class="bar" style="width:{width}px"></span></td>')
    return "".join(cells)


def _fmt_position(pos: Any) -> str:
    return "" if pos is None else f", z={float(pos):g}"


def _kv_table(rows: Sequence[tuple[str, Any]], code: bool = False) -> str:
    body = "".join(
        f"<tr><th>{e(k)}</th><td>{f'<code>{e(v)}</code>' if code else e(v)}</td></tr>" for k, v in rows
    )
    return f"<table><tbody>{body}</tbody></table>"


def _fmt_timing(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.3f} s" if value < 100 else f"{value:.1f} s"


def render_report(
    *,
    model: Mapping[str, Any],
    slices: Sequence[Any],
    studies: Sequence[StudyPrediction | Mapping[str, Any]],
    skipped: Sequence[Any] = (),
    counts: Mapping[str, Any] | None = None,
    timing: Mapping[str, Any] | None = None,
    command: str | Sequence[str] | None = None,
    title: str = "ctmask infer report",
) -> str:
    """The report as an HTML string (arguments: :func:`write_report`)."""
    slice_views = [_slice_view(s) for s in slices]
    study_views = [_study_view(s) for s in studies]
    class_names = _class_names(model, slice_views, study_views)
    for rec in [*slice_views, *study_views]:  # classes the model did not declare still get columns
        for c in [rec["class"], *rec["probs"]]:
            if c and c not in class_names:
                class_names.append(c)
    overlays = _Overlays({s["key"]: s["overlay"] for s in slice_views})
    with_overlays = any(s["overlay"] is not None for s in slice_views)
    study_anchor = {s["study"]: f"st{i}" for i, s in enumerate(study_views, 1)}
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="sub">{len(study_views)} studies, {len(slice_views)} slices, {len(skipped)} skipped files; '
        f"written {generated} by ctmask {e(__version__)}</p>",
    ]

    out.extend(_counts_section(class_names, study_views, slice_views, counts))
    head = "".join(f'<th class="num">{e(c)}</th>' for c in class_names)
    out.extend(_studies_section(study_views, class_names, head, overlays, with_overlays, study_anchor))
    out.extend(_slices_section(slice_views, class_names, head, overlays, with_overlays, study_anchor))
    out.extend(_skipped_section(skipped))
    out.extend(_model_section(model))
    out.extend(_run_section(command, timing))
    out.append("</body></html>\n")
    return "\n".join(out)


def _counts_section(class_names: list[str], study_views: list[dict], slice_views: list[dict],
                    counts: Mapping[str, Any] | None) -> list[str]:
    """Counts per class."""
    out = []
    out.append('<h2 id="counts">Counts</h2><table><thead><tr><th>class</th><th class="num">studies</th>'
               '<th class="num">slices</th></tr></thead><tbody>')
    for c in class_names:
        n_st = sum(s["class"] == c for s in study_views)
        n_sl = sum(s["class"] == c for s in slice_views)
        pct_st = f" ({100 * n_st / len(study_views):.0f}%)" if study_views else ""
        pct_sl = f" ({100 * n_sl / len(slice_views):.0f}%)" if slice_views else ""
        out.append(f'<tr><td>{_badge(c, class_names)}</td><td class="num">{n_st}{pct_st}</td>'
                   f'<td class="num">{n_sl}{pct_sl}</td></tr>')
    out.append(f'<tr><th>total</th><td class="num">{len(study_views)}</td><td class="num">{len(slice_views)}</td>'
               "</tr></tbody></table>")
    if counts:
        out.append(_kv_table([(k, v) for k, v in counts.items()]))
    return out


def _studies_section(study_views: list[dict], class_names: list[str], head: str, overlays: _Overlays,
                     with_overlays: bool, study_anchor: dict[str, str]) -> list[str]:
    """Studies: the call, the class scores and the driving slices of each."""
    out = []
    rules = sorted({s["rule"].split()[0] for s in study_views if s["rule"]})
    out.append(f'<h2 id="studies">Studies ({len(study_views)})</h2>')
    out.append(f'<p class="small">Rule {e(", ".join(rules) or RULE)} (k per study, next to its key): a lesion class '
               "scores the mean of its k highest slice probabilities, normal the mean of its k lowest; the highest "
               "score is the call. Scores shown normalised to sum to 1 (hover for the raw score). Driving slices: the "
               "k slices behind the call, with their probability of the called class.</p>")
    out.append(f"<table><thead><tr><th>#</th><th>study</th><th>call</th>{head}<th>driving slices</th></tr>"
               "</thead><tbody>")
    for i, st in enumerate(study_views, 1):
        series = [s for s in st["series"] if s != st["study"]]
        series_html = "".join(f'<br><span class="small mono">series {e(s)}</span>' for s in series)
        driving = []
        for d in st["driving"]:
            caption = f"{e(d['label'])}<br>p={float(d['prob']):.3f}{e(_fmt_position(d['position']))}"
            if with_overlays:
                driving.append(overlays.figure(str(d["key"]), str(d["label"]), caption))
            else:
                driving.append(f'<div class="small">{caption}</div>')
        n = st["n_slices"]
        out.append(
            f'<tr class="study" id="{study_anchor[st["study"]]}"><td class="num">{i}</td>'
            f'<td><span class="mono">{e(st["study"])}</span>{series_html}'
            f'<br><span class="small">{e(n)} slice{"" if n == 1 else "s"}; {e(st["rule"])}</span></td>'
            f"<td>{_badge(st['class'], class_names)}</td>"
            f"{_prob_cells(st['probs'], class_names, st['class'], st['scores'])}<td>{''.join(driving)}</td></tr>"
        )
    out.append("</tbody></table>")
    return out


def _slices_section(slice_views: list[dict], class_names: list[str], head: str, overlays: _Overlays,
                    with_overlays: bool, study_anchor: dict[str, str]) -> list[str]:
    """Slices (collapsed)."""
    out = []
    out.append(f'<details id="slices"><summary>Slices ({len(slice_views)})</summary>')
    ov_head = "<th>overlay</th>" if with_overlays else ""
    out.append(f"<table><thead><tr><th>#</th><th>slice</th><th>study</th><th>class</th>{head}{ov_head}</tr>"
               "</thead><tbody>")
    for i, sl in enumerate(slice_views, 1):
        anchor = study_anchor.get(sl["study"])
        study_cell = f'<a href="#{anchor}">{e(sl["study"])}</a>' if anchor else e(sl["study"])
        ov = ""
        if with_overlays:
            ov = f"<td>{overlays.figure(sl['key'], sl['label'], e(sl['label']))}</td>"
        out.append(
            f'<tr class="slice"><td class="num">{i}</td><td><span class="mono" title="{e(sl["key"])}">'
            f'{e(sl["label"])}</span>{e(_fmt_position(sl["position"]))}</td><td class="mono">{study_cell}</td>'
            f"<td>{_badge(sl['class'], class_names)}</td>{_prob_cells(sl['probs'], class_names, sl['class'])}{ov}</tr>"
        )
    out.append("</tbody></table></details>")
    return out


def _skipped_section(skipped: Sequence[Any]) -> list[str]:
    """Skipped files."""
    out = []
    out.append(f'<h2 id="skipped">Skipped files ({len(skipped)})</h2>')
    if skipped:
        out.append("<table><thead><tr><th>file</th><th>reason</th></tr></thead><tbody>")
        for item in skipped:
            if isinstance(item, (tuple, list)):
                file, reason = item[0], item[1]
            else:
                file, reason = _get(item, "file", default=""), _get(item, "reason", "error", default="")
            out.append(f'<tr class="skipped"><td class="mono">{e(file)}</td><td>{e(reason)}</td></tr>')
        out.append("</tbody></table>")
    else:
        out.append("<p>None.</p>")
    return out


def _model_section(model: Mapping[str, Any]) -> list[str]:
    """Model."""
    out = []
    out.append('<h2 id="model">Model</h2>')
    out.append(_kv_table(_model_rows(model)))
    meta = model.get("metadata") or {}
    if meta:
        out.append(f"<details><summary>Model metadata ({len(meta)} keys)</summary>")
        out.append(_kv_table([(k, meta[k]) for k in sorted(meta)], code=True))
        out.append("</details>")
    return out


def _run_section(command: str | Sequence[str] | None, timing: Mapping[str, Any] | None) -> list[str]:
    """Run: the command and its timing."""
    out = []
    out.append('<h2 id="run">Run</h2>')
    if command is not None:
        text = command if isinstance(command, str) else shlex.join(str(c) for c in command)
        out.append(f"<p>Command: <code>{e(text)}</code></p>")
    if timing:
        out.append(_kv_table([(k, _fmt_timing(v)) for k, v in timing.items()]))
    return out


def _model_rows(model: Mapping[str, Any]) -> list[tuple[str, Any]]:
    meta = model.get("metadata") or {}

    def m(name: str) -> Any:
        return meta.get(f"ctmask.{name}", meta.get(name, ""))

    path = model.get("path")
    sha = model.get("sha256")
    if not sha and path is not None and Path(path).is_file():
        sha = sha256_file(path)
    return [
        ("file", path or ""),
        ("sha256", sha or ""),
        ("runner", model.get("runner", "")),
        ("preset", m("preset")),
        ("precision", m("precision")),
        ("input size", m("input_size")),
        ("classes", _class_list(m("class_names"))),
        ("weights sha256", m("weights_sha256")),
        ("checkpoint", m("checkpoint")),
        ("exported by ctmask", m("version")),
        ("report by ctmask", __version__),
    ]


def _class_list(value: Any) -> str:
    """The ``ctmask.class_names`` metadata (a JSON list) as text; shown as it is when not JSON."""
    if not value:
        return ""
    try:
        names = json.loads(value) if isinstance(value, str) else value
        return ", ".join(str(n) for n in names)
    except (TypeError, ValueError):
        return str(value)


def write_report(
    path: str | Path,
    *,
    model: Mapping[str, Any],
    slices: Sequence[Any],
    studies: Sequence[StudyPrediction | Mapping[str, Any]],
    skipped: Sequence[Any] = (),
    counts: Mapping[str, Any] | None = None,
    timing: Mapping[str, Any] | None = None,
    command: str | Sequence[str] | None = None,
    title: str = "ctmask infer report",
) -> None:
    """Write the run's HTML report to ``path`` atomically (no partial file on error).

    Args:
        path: the ``.html`` file.
        model: ``path`` (the model file), ``metadata`` (its ``ctmask.*`` metadata, e.g.
            ``GraphSpec.metadata()``), ``runner`` (a description, e.g. ``onnxruntime CPU``),
            optionally ``sha256`` (computed from ``path`` when absent) and ``class_names``.
        slices: per-slice records (dicts or objects): ``key`` (or ``file``), ``label``,
            ``class`` (or ``class_name``), ``probs``, ``study``, ``series``, ``position``,
            ``overlay`` (a PNG path, or None when none was written).
        studies: :class:`StudyPrediction` objects or their ``to_dict()`` records.
        skipped: ``(file, reason)`` pairs, or objects with ``file`` and ``reason``.
        counts: run counts to show (name -> value), e.g. files found, slices predicted.
        timing: step -> seconds (numbers are shown as seconds, strings as they are).
        command: the command line (a string, or argv).
        title: the page title.
    """
    text = render_report(model=model, slices=slices, studies=studies, skipped=skipped, counts=counts,
                         timing=timing, command=command, title=title)
    # A file name that is not UTF-8 (surrogate-escaped by Python) is shown with backslash escapes.
    write_bytes_atomic(path, text.encode("utf-8", errors="backslashreplace"))
