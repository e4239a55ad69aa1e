"""The HTML report (ctmask.runtime.report): self-contained, escaped, and rendered by a real browser."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageStat

from ctmask.core.fileio import sha256_file
from ctmask.core.spec import GraphSpec
from ctmask.runtime.report import THUMB_PX, render_report, write_report
from ctmask.runtime.study import aggregate

CLASSES = ("normal", "pneumonia", "covid19")
EVIL = "evil<script>alert(1)</script>.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (make test installs it: apt-get install chromium)")


def overlay_png(path: Path, size: tuple[int, int] = (512, 512), seed: int = 0, mode: str = "RGB") -> Path:
    """A CT-like slice (grey body, noise) with a red lesion blob, as a PNG."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("L", size, 0)
    ImageDraw.Draw(img).ellipse((w * 0.1, h * 0.15, w * 0.9, h * 0.85), fill=110)
    noisy = np.clip(np.asarray(img, np.float32) + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(noisy, "L").convert(mode)
    x, y = rng.uniform(0.25, 0.6) * w, rng.uniform(0.3, 0.6) * h
    ImageDraw.Draw(rgb).ellipse((x, y, x + w * 0.15, y + h * 0.12), fill=(220, 40, 40, 255)[: len(mode)])
    rgb.save(path, compress_level=1)
    return path


def slice_rec(key: str, probs: tuple[float, float, float], study: str, overlay: Path | None,
              label: str = "", position: float | None = None, series: str = "") -> dict:
    p = dict(zip(CLASSES, probs))
    return {"key": key, "label": label or key, "class": max(p, key=lambda c: p[c]), "probs": p, "study": study,
            "series": series or study, "position": position, "overlay": None if overlay is None else str(overlay)}


@pytest.fixture()
def inputs(tmp_path) -> dict:
    """Synthetic records of a run: a DICOM study of 6 slices (3 COVID), a NIfTI volume of 3,
    a loose image whose name holds a script tag and whose overlay file is missing."""
    ov = tmp_path / "overlays"
    ov.mkdir()
    slices = []
    for i in range(6):
        covid = i in (2, 3, 4)
        overlay = overlay_png(ov / f"IM{i}.png", seed=i) if i != 5 else None  # the last: no overlay written
        probs = (0.04, 0.03, 0.93) if covid else (0.95, 0.03, 0.02)
        slices.append(slice_rec(f"dicom/IM{i}", probs, "1.2.840.99", overlay, label=f"series1/IM{i}",
                                position=-120.0 + 5 * i, series="1.2.840.99.1"))
    for z in range(3):
        overlay = overlay_png(ov / f"vol_{z}.png", size=(300, 200), seed=10 + z, mode="RGBA" if z == 1 else "RGB")
        slices.append(slice_rec(f"ct.nii.gz#{z}", (0.2, 0.7, 0.1), "ct.nii.gz", overlay, label=f"ct.nii.gz[z={z}]",
                                position=float(z)))
    slices.append(slice_rec(EVIL, (0.9, 0.05, 0.05), EVIL, ov / "never_written.png"))
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(b"not really onnx")
    spec = GraphSpec(preset="small", image_size=256, n_rois=32, weights_sha256="ab" * 32, checkpoint_name="cls.pt")
    return {
        "model": {"path": str(model_path), "metadata": spec.metadata(), "runner": "onnxruntime CPUExecutionProvider"},
        "slices": slices,
        "studies": aggregate(slices, CLASSES),
        "skipped": [("scans/broken.png", "cannot identify image file"),
                    ("<img src=x onerror=alert(2)>.dcm", "not a DICOM file & no image suffix")],
        "counts": {"files found": 12, "slices predicted": 10, "skipped": 2},
        "timing": {"decode": 0.412, "inference": 1.25, "total": 1.9},
        "command": ["ctmask", "infer", "model.onnx", "scans/", "--report", "out/report.html"],
    }


class Page(HTMLParser):
    """Tags, attributes and text of an HTML document."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.classes: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        self.classes.extend((a.get("class") or "").split())

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]


def check_page(page: Page, inputs: dict) -> None:
    """What both the written HTML and the browser's DOM must satisfy."""
    text = " ".join(page.text)
    tags = {t for t, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "base"}, tags
    assert not [(t, k) for t, a in page.tags for k in a if k.startswith("on")]  # no event handlers
    # The hostile names are shown as text.
    assert EVIL in text and "<img src=x onerror=alert(2)>.dcm" in text
    # No external or missing resources: every link is an anchor of the page, every source inline.
    ids = {a["id"] for _, a in page.tags if "id" in a}
    for t, a in page.tags:
        for attr in ("href", "src", "srcset", "action", "poster", "background", "data"):
            if attr in a:
                value = a[attr] or ""
                assert value.startswith(("#", "data:")), (t, attr, value[:80])
                if value.startswith("#"):
                    assert value[1:] in ids, value
    # Thumbnails: valid PNG / JPEG data URIs, shrunk, each overlay once (8 written, 1 missing file, 1 none).
    imgs = page.all("img")
    assert len(imgs) == 8
    for a in imgs:
        head, _, data = a["src"].partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            im.load()
            assert im.format in ("PNG", "JPEG") and max(im.size) <= THUMB_PX
    assert page.classes.count("missing") == 3 and text.count("overlay missing") == 3  # the loose image: twice
    # One row per study and per slice; counts, model and run facts.
    assert page.classes.count("study") == len(inputs["studies"]) == 3
    assert page.classes.count("slice") == len(inputs["slices"])
    assert page.classes.count("skipped") == 2
    for needle in ("1.2.840.99", "ct.nii.gz", "covid19", "pneumonia", "cannot identify image file",
                   sha256_file(inputs["model"]["path"]), "ab" * 32, "small", "fp32", "onnxruntime CPUExecutionProvider",
                   "ctmask infer model.onnx scans/ --report out/report.html", "1.250 s", "files found"):
        assert needle in text, needle


def test_report_is_self_contained_and_escaped(inputs, tmp_path):
    out = tmp_path / "report.html"
    write_report(out, **inputs)
    raw = out.read_text(encoding="utf-8")
    assert "<script>" not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "url(" not in raw and "@import" not in raw and "http://" not in raw and "https://" not in raw
    check_page(Page(raw), inputs)
    # The studies: the DICOM study is COVID-19 (3 lesion slices of 6), driven by them.
    by_study = {s.study: s for s in inputs["studies"]}
    assert by_study["1.2.840.99"].class_name == "covid19"
    assert [d.label for d in by_study["1.2.840.99"].driving[:3]] == ["series1/IM2", "series1/IM3", "series1/IM4"]
    assert by_study["ct.nii.gz"].class_name == "pneumonia" and by_study[EVIL].class_name == "normal"
    # Study records as dicts (to_dict / JSONL) give the same page, up to its time stamp.
    as_dicts = render_report(**{**inputs, "studies": [s.to_dict() for s in inputs["studies"]]})
    strip = [line for line in as_dicts.splitlines() if "written " not in line]
    assert strip == [line for line in raw.splitlines() if "written " not in line]


def test_report_without_overlays_or_studies(inputs, tmp_path):
    slices = [{**s, "overlay": None} for s in inputs["slices"]]
    page = Page(render_report(model={}, slices=slices, studies=[], skipped=[]))
    assert page.all("img") == [] and "overlay missing" not in " ".join(page.text)
    assert "None." in page.text


def test_report_is_written_atomically(inputs, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("previous report")
    bad = [*inputs["slices"], {"key": "x", "probs": {"normal": "not a number"}, "class": "normal"}]
    with pytest.raises(ValueError):
        write_report(out, **{**inputs, "slices": bad})
    assert out.read_text() == "previous report" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx", "overlays", "report.html"]


def test_report_of_300_slices_stays_small(tmp_path):
    """300 slices of 512 px overlays: thumbnails are shrunk, the page stays a few MB and is quick to write."""
    files = [overlay_png(tmp_path / f"o{i}.png", seed=i) for i in range(10)]
    slices = [slice_rec(f"s{i:03d}.png", (0.9, 0.05, 0.05) if i % 3 else (0.1, 0.1, 0.8), f"study{i // 30}",
                        files[i % 10], position=float(i)) for i in range(300)]
    t0 = time.perf_counter()
    out = tmp_path / "big.html"
    write_report(out, model={}, slices=slices, studies=aggregate(slices, CLASSES), skipped=[])
    elapsed = time.perf_counter() - t0
    size = out.stat().st_size
    page = Page(out.read_text())
    assert len(page.all("img")) == 300  # each slice's overlay once, studies' driving slices linking to theirs
    assert size < 300 * 24_000, size
    assert elapsed < 10, elapsed


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@needs_chromium
def test_report_renders_in_headless_chromium(inputs, tmp_path):
    out = tmp_path / "report.html"
    write_report(out, **inputs)
    url = out.resolve().as_uri()
    shot = tmp_path / "out.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1280,2000", url, profile=tmp_path / "profile1")
    assert shot.is_file(), run.stderr[-2000:]
    with Image.open(shot) as im:
        im.load()
        assert im.size == (1280, 2000)
        grey = im.convert("L")
        assert ImageStat.Stat(grey).stddev[0] > 10  # not blank
        rgb = np.asarray(im.convert("RGB")).astype(int)
    # Thumbnails and badges are painted: strongly red pixels exist (lesion blobs, COVID-19 badges).
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    assert red.sum() > 500
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile2")
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout
    check_page(Page(dom.stdout), inputs)
