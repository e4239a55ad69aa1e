"""The torch-free runtime: runners, model errors, batch prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctmask.core.errors import ConfigError, ModelError
from ctmask.core.preprocess import Preprocessing
from ctmask.core.presets import SMALL
from ctmask.core.spec import GraphSpec
from ctmask.runtime.batch_run import PredictOptions, predict_files
from ctmask.runtime.predict import CropBoxes, PredictionWriter, collect_images
from ctmask.runtime.runner import OnnxRuntimeRunner, Runner
from ctmask.scans.batch import load_batch


class CountingRunner(OnnxRuntimeRunner):
    def __init__(self, path):
        super().__init__(path)
        self.batches = []

    def infer_impl(self, feed):
        self.batches.append(feed["images"].shape[0])
        return super().infer_impl(feed)


def test_model_errors_name_the_file(tmp_path, foreign_model):
    with pytest.raises(ModelError, match="does not exist"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx").activate()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf\x00\x01")
    with pytest.raises(ModelError, match="not a loadable ONNX model") as exc:
        OnnxRuntimeRunner(junk).activate()
    assert str(junk) in str(exc.value)
    with pytest.raises(ModelError, match="no ctmask metadata"):
        OnnxRuntimeRunner(foreign_model).activate()
    with pytest.raises(ConfigError):
        OnnxRuntimeRunner(junk, device="tpu")


def test_runner_reports_the_provider_that_runs(small_onnx):
    with OnnxRuntimeRunner(small_onnx, threads=1) as r:
        d = r.describe()
    assert d["provider"] == "CPUExecutionProvider" and d["threads"] == 1
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with OnnxRuntimeRunner(small_onnx, device="cuda") as r:
            d = r.describe()
        assert d["requested_provider"] == "CUDAExecutionProvider"
        assert d["provider"] == "CPUExecutionProvider" and d["fell_back_to_cpu"] is True


def test_runner_checks_input_shape(small_onnx):
    with OnnxRuntimeRunner(small_onnx) as r:
        with pytest.raises(ValueError, match="expected float32"):
            r.infer({"images": np.zeros((1, 1, 64, 64), np.float32)})


def test_batching_batches_and_matches_single_slices(small_onnx, synth_dir):
    files, failures = collect_images([synth_dir / "images"])
    assert len(files) == 24 and not failures
    r = CountingRunner(small_onnx).activate()
    batched = list(predict_files(r, files[:11], PredictOptions(batch_size=4)))
    assert r.batches == [4, 4, 3]
    single = list(predict_files(r, files[:11], PredictOptions(batch_size=1)))
    assert [p.file for p in batched] == [str(f) for f in files[:11]]
    for a, b in zip(batched, single):
        assert a.class_name == b.class_name
        assert max(abs(a.probs[k] - b.probs[k]) for k in a.probs) < 1e-4
        assert 0 < a.n_rois <= 64 and len(a.rois) == 5 and a.rois[0][0] >= a.rois[-1][0]


def test_unreadable_slice_is_a_failure_and_the_rest_go_on(small_onnx, synth_dir, tmp_path):
    import shutil

    good = sorted((synth_dir / "images").glob("test_*.png"))[:3]
    for f in good:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "b_broken.png").write_bytes(good[0].read_bytes()[:200])  # truncated PNG
    files, failures = collect_images([tmp_path, tmp_path / "nope.png"])
    assert [f.file for f in failures] == [str(tmp_path / "nope.png")]
    with OnnxRuntimeRunner(small_onnx) as r:
        items = list(predict_files(r, files, PredictOptions(batch_size=2)))
    bad = [i for i in items if not hasattr(i, "probs")]
    assert [b.file for b in bad] == [str(tmp_path / "b_broken.png")] and "cannot decode" in bad[0].reason
    assert sum(hasattr(i, "probs") for i in items) == 3


def test_prediction_writer_touches_nothing_before_its_first_record_and_keeps_whole_records(tmp_path):
    import json

    out = tmp_path / "p.jsonl"
    out.write_text("an earlier run's file\n")
    with pytest.raises(RuntimeError):
        with PredictionWriter(out, ("a", "b", "c")):
            raise RuntimeError("crash before the first record")
    assert out.read_text() == "an earlier run's file\n"
    rec = {"file": "x.png", "class": "a", "class_index": 0, "probs": {"a": 1.0, "b": 0.0, "c": 0.0}}
    with pytest.raises(RuntimeError):
        with PredictionWriter(out, ("a", "b", "c")) as w:
            w.write_record(rec)
            w.flush()
            assert [json.loads(line) for line in out.read_text().splitlines()] == [rec]  # readable mid-run
            raise RuntimeError("crash mid-run")
    assert [json.loads(line) for line in out.read_text().splitlines()] == [rec]  # kept, for --resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
    with pytest.raises(ConfigError, match="use .jsonl, .csv or .parquet"):
        PredictionWriter(tmp_path / "p.txt", ("a",))


def test_dicom_is_decoded_like_its_rendering(small_onnx, tmp_path):
    """The runtime windows DICOM with the model's metadata window, as the PNGs were made:
    the decoded input arrays agree to the quantisation of the two files."""
    from PIL import Image
    from tests_helpers import write_ct_dicom

    from ctmask.data.synth import generate_slice
    from ctmask.scans.decode import read_slice

    s = generate_slice(5, 0, 2)
    assert -1024 <= s.hu.min() and s.hu.max() <= 3071  # storable as uint16 with intercept -1024
    write_ct_dicom(tmp_path / "slice.dcm", s.hu)
    Image.fromarray(s.image).save(tmp_path / "slice.png")
    # PNG: 8 bits of the window (<= 0.5 / 255 off); DICOM: HU rounded to integers (<= 0.5 / width off).
    with OnnxRuntimeRunner(small_onnx) as r:
        spec = r.spec
    width = spec.window[1]
    tol = 0.5 / 255 + 0.5 / width + 1e-6
    dcm_full = read_slice(tmp_path / "slice.dcm", spec.window).pixels
    png_full = read_slice(tmp_path / "slice.png").pixels
    assert dcm_full.shape == png_full.shape == (512, 512)
    np.testing.assert_allclose(dcm_full, png_full, rtol=0, atol=tol)
    loaded = load_batch([tmp_path / "slice.dcm", tmp_path / "slice.png"], spec)
    batch, failures = loaded.batch, loaded.failures
    assert not failures and batch.shape == (2, 1, spec.image_size, spec.image_size)
    np.testing.assert_allclose(batch[0], batch[1], rtol=0, atol=tol)  # resizing only averages the errors
    assert np.abs(batch[0] - batch[1]).mean() < 1.5e-3
    # A 5% wider window is already far outside that: the check sees the window.
    other = GraphSpec.for_preset(SMALL, window=(spec.window[0], width * 1.05))
    off = np.abs(load_batch([tmp_path / "slice.dcm"], other).batch[0] - batch[1]).max()
    assert off > 10 * tol


class SpecOnlyRunner(Runner):
    """A runner that never gets a batch: only its spec matters."""

    def __init__(self, spec):
        super().__init__()
        self.fixed = spec

    def activate_impl(self):
        return self.fixed

    def infer_impl(self, feed):
        raise AssertionError("no slice should reach the model")

    def deactivate_impl(self):
        pass


def test_crop_boxes_from_a_split_file(tmp_path):
    from PIL import Image

    from ctmask.scans.batch import load_slice

    img = np.zeros((40, 60), np.uint8)
    img[10:30, 20:50] = 200
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(img).save(tmp_path / "images" / name)
    split = tmp_path / "split.txt"
    split.write_text("a.png 2 20 10 50 30\nb.png 0 0 0 60 40\n")
    boxes = CropBoxes.from_split(split)
    elsewhere = tmp_path / "copy" / "a.png"  # same name in another folder: matched by name
    elsewhere.parent.mkdir()
    elsewhere.write_bytes((tmp_path / "images" / "a.png").read_bytes())
    assert boxes.lookup(tmp_path / "images" / "a.png") == boxes.lookup(elsewhere) == (20, 10, 50, 30)
    assert boxes.lookup(tmp_path / "images" / "c.png") is None
    ambiguous = CropBoxes([(tmp_path / "x" / "s.png", (0, 0, 5, 5)), (tmp_path / "y" / "s.png", (1, 1, 5, 5))], "f")
    assert ambiguous.lookup(tmp_path / "x" / "s.png") == (0, 0, 5, 5) and ambiguous.lookup(tmp_path / "s.png") is None

    spec = GraphSpec.for_preset(SMALL, preprocessing=Preprocessing(crop=True))
    files = [tmp_path / "images" / n for n in ("a.png", "c.png")]
    loaded = load_batch(files, spec, boxes)
    batch, ok, failures = loaded.batch, loaded.paths, loaded.failures
    assert ok == files[:1] and [f.file for f in failures] == [str(files[1])]
    assert "no crop box" in failures[0].reason and str(split) in failures[0].reason
    np.testing.assert_array_equal(batch[0, 0], load_slice(files[0], spec.image_size, box=(20, 10, 50, 30)))
    assert np.allclose(batch[0, 0], 200 / 255)  # the box holds only the bright block

    with SpecOnlyRunner(spec) as r:
        with pytest.raises(ConfigError, match="trained on slices cropped") as err:
            list(predict_files(r, files))
        assert "--boxes" in str(err.value) and "--uncropped" in str(err.value)


def test_graph_metadata_carries_the_preprocessing():
    spec = GraphSpec.for_preset(SMALL, preprocessing=Preprocessing(crop=True), weights_sha256="ab" * 32)
    meta = spec.metadata()
    back = GraphSpec.from_metadata(meta, "m.onnx")
    assert back.crop and back.resize == "bilinear" and back.weights_sha256 == "ab" * 32 and back == spec
    assert back.preprocessing == Preprocessing(crop=True)
    # Graphs written before the key existed were served uncropped.
    del meta["ctmask.preprocess"], meta["ctmask.weights_sha256"]
    old = GraphSpec.from_metadata(meta, "m.onnx")
    assert not old.crop and old.weights_sha256 == ""
    meta["ctmask.preprocess"] = '{"crop": true, "resize": "lanczos"}'
    with pytest.raises(ModelError, match="unsupported resize method 'lanczos'"):
        GraphSpec.from_metadata(meta, "m.onnx")


def test_a_split_file_listing_one_slice_with_two_boxes_is_refused(tmp_path):
    """--boxes: the same path twice with different boxes is an error naming file and line
    (not the last box silently); the same box twice is harmless."""
    from ctmask.core.errors import DataError

    split = tmp_path / "boxes.txt"
    split.write_text("a.png 0 0 0 40 40\nb.png 0 1 1 30 30\na.png 1 0 0 50 50\n")
    with pytest.raises(DataError) as err:
        CropBoxes.from_split(split)
    msg = str(err.value)
    assert msg.startswith(f"{split}: line 3: a.png") and "[0, 0, 50, 50]" in msg and "line 1" in msg
    split.write_text("a.png 0 0 0 40 40\na.png 1 0 0 40 40\n")
    assert CropBoxes.from_split(split).lookup(tmp_path / "a.png") == (0, 0, 40, 40)


def test_load_batch_turns_every_bad_slice_into_a_failure(tmp_path):
    """The decoding path of infer, parity and bench: bad files become failures with the
    reason, the good ones are decoded; no exception escapes."""
    from PIL import Image
    from test_preprocess import write_bad_slices
    from tests_helpers import write_ct_dicom

    bad = write_bad_slices(tmp_path / "bad")
    good = [tmp_path / "good.png", tmp_path / "good.dcm"]
    Image.fromarray(np.full((64, 48), 100, np.uint8)).save(good[0])
    write_ct_dicom(good[1], np.full((40, 40), -600.0, np.float32))
    spec = GraphSpec.for_preset(SMALL)
    files = [good[0], *bad, good[1]]
    loaded = load_batch(files, spec)
    batch, ok, failures = loaded.batch, loaded.paths, loaded.failures
    assert ok == good and batch.shape == (2, 1, spec.image_size, spec.image_size) and np.isfinite(batch).all()
    assert {f.file: f.reason for f in failures}.keys() == {str(p) for p in bad}
    for f in failures:
        assert bad[Path(f.file)] in f.reason, f


def test_infer_skips_undecodable_slices_and_writes_the_rest(small_onnx, synth_dir, tmp_path):
    """A decompression bomb, DICOM with a non-numeric / NaN / infinite rescale, a 1x1 image,
    NaN pixels among good slices: the good ones are predicted and written, each bad one is
    reported with its path and reason, exit 1, no traceback."""
    import json

    from test_preprocess import write_bad_slices
    from typer.testing import CliRunner

    from ctmask.cli.main import app

    bad = write_bad_slices(tmp_path / "bad")
    good = sorted((synth_dir / "images").glob("test_*.png"))[:2]
    out = tmp_path / "preds.jsonl"
    args = ["infer", small_onnx, good[0], *bad, good[1], "--out", out, "-b", "3", "-q", "--json", tmp_path / "s.json"]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in records] == [str(p) for p in good]
    for path, words in bad.items():
        assert f"skipped {path}: " in res.output and words in res.output, (path, res.output)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["predicted"] == 2 and {s["file"] for s in summary["skipped"]} == {str(p) for p in bad}


@pytest.mark.parametrize("value", ['{"logits": {"atol": 0.001, "note": "x"}}', "not json", "[1, 2]",
                                   '{"logits": 5}', '{"logits": {"atol": "loose"}}'])
def test_malformed_informational_tolerances_do_not_make_a_graph_unusable(value):
    """Parity never judges by the graph's own ``ctmask.tolerances`` (ctmask's table does), so a
    malformed value only means it declares none; the model still loads."""
    spec = GraphSpec.for_preset(SMALL)
    meta = {**spec.metadata(), "ctmask.tolerances": value}
    back = GraphSpec.from_metadata(meta, "m.onnx")
    assert back == spec and back.declared_tolerances is None and back.tolerances == spec.tolerances
    del meta["ctmask.tolerances"]
    assert GraphSpec.from_metadata(meta, "m.onnx").declared_tolerances is None
    good = GraphSpec.from_metadata(spec.metadata(), "m.onnx")
    assert good.declared_tolerances == spec.tolerances


def _with_metadata(src: Path, dst: Path, **meta: str) -> Path:
    """Copy of the graph ``src`` with ``metadata_props`` entries replaced."""
    import onnx

    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key in meta:
            prop.value = meta[prop.key]
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("key, value, words", [
    ("ctmask.input_size", "1024", "ctmask.input_size says 1024, but the graph's input images is [batch, 1, 192, 192]"),
    ("ctmask.input_size", "0", "ctmask.input_size: input size 0 is outside [32, 8192]"),
    ("ctmask.n_rois", "32", "ctmask.n_rois says 32, but the graph's output rois is [batch, 64, 5]"),
    ("ctmask.window", '{"level": -600, "width": 0}', "ctmask.window: width 0.0 is not in (0, 100000] HU"),
    ("ctmask.window", '{"level": -600, "width": NaN}', "ctmask.window: width nan is not in"),
    ("ctmask.window", '{"level": Infinity, "width": 1500}', "ctmask.window: level inf is not a finite"),
    ("ctmask.class_names", '["covid", "normal"]',
     "ctmask.class_names names 2 classes, but the graph's output logits is [batch, 3]"),
    ("ctmask.class_names", '["a", "a", "b"]',
     "ctmask.class_names: expected 2 to 1000 distinct names, got 3 (2 distinct)"),
    ("ctmask.class_names", '"abc"', "ctmask.class_names must be a JSON list of names, got str"),
    ("ctmask.class_names", "[" * 200_000 + "]" * 200_000, "ctmask.class_names is JSON nested too deeply"),
])
def test_metadata_is_checked_against_the_graph_and_sane_ranges_at_load(small_onnx, synth_dir, tmp_path, key, value,
                                                                      words):
    """Edited metadata is refused when the model is loaded, naming the file and the field, before any
    slice is read: not an onnxruntime / Pillow traceback later, nor every DICOM blamed as "not finite",
    nor a probability silently dropped."""
    from tests_helpers import invoke

    from ctmask.core.graphs import load_proto, read_spec, spec_of

    bad = _with_metadata(small_onnx, tmp_path / "edited.onnx", **{key: value})
    for load in (lambda: OnnxRuntimeRunner(bad).activate(), lambda: spec_of(load_proto(bad), bad),
                 lambda: read_spec(bad)):
        with pytest.raises(ModelError) as err:
            load()
        assert words in str(err.value) and str(bad) in str(err.value), str(err.value)
    slices = sorted((synth_dir / "images").glob("*.png"))[:2]
    res = invoke("infer", bad, *slices, "--out", tmp_path / "p.jsonl", "-q")
    assert res.exit_code == 2 and key in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "p.jsonl").exists()
