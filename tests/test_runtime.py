"""The torch-free runtime: runners, model errors, batch prediction."""

from __future__ import annotations

import numpy as np
import pytest

from ctmask.core.errors import ConfigError
from ctmask.core.spec import ModelError
from ctmask.runtime.predict import PredictionWriter, collect_images, predict_files
from ctmask.runtime.runner import OnnxRuntimeRunner


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
    batched = list(predict_files(r, files[:11], batch_size=4))
    assert r.batches == [4, 4, 3]
    single = list(predict_files(r, files[:11], batch_size=1))
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
        items = list(predict_files(r, files, batch_size=2))
    bad = [i for i in items if not hasattr(i, "probs")]
    assert [b.file for b in bad] == [str(tmp_path / "b_broken.png")] and "cannot decode" in bad[0].reason
    assert sum(hasattr(i, "probs") for i in items) == 3


def test_prediction_writer_is_atomic(tmp_path):
    out = tmp_path / "p.jsonl"
    with pytest.raises(RuntimeError):
        with PredictionWriter(out, ("a", "b", "c")):
            raise RuntimeError("crash mid-run")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="use .jsonl or .csv"):
        PredictionWriter(tmp_path / "p.txt", ("a",))


def test_dicom_and_its_rendering_get_the_same_call(small_onnx, tmp_path):
    """The runtime windows DICOM with the model's metadata window, as the PNGs were made."""
    from PIL import Image
    from tests_helpers import write_ct_dicom

    from ctmask.data.synth import generate_slice

    s = generate_slice(5, 0, 2)
    hu = np.clip(s.hu, -1024, 3071)
    write_ct_dicom(tmp_path / "slice.dcm", hu)
    Image.fromarray(s.image).save(tmp_path / "slice.png")
    with OnnxRuntimeRunner(small_onnx) as r:
        dcm, png = list(predict_files(r, [tmp_path / "slice.dcm", tmp_path / "slice.png"], batch_size=2))
    assert dcm.class_name == png.class_name
    assert max(abs(dcm.probs[k] - png.probs[k]) for k in dcm.probs) < 0.02  # 8-bit rendering vs float HU
