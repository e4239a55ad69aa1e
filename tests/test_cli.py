"""The typer CLI: JSON outputs, user errors without tracebacks, nothing half-written."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from ctmask.cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_model_info_paper_json():
    res = invoke("model-info", "--preset", "paper", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["mask_rcnn_total"] == 31_728_744 and info["classifier_s"] == 2_364_419


def test_unknown_preset_is_a_clear_error():
    res = invoke("model-info", "--preset", "huge")
    assert res.exit_code == 2
    assert "unknown preset 'huge'" in res.output and "Traceback" not in res.output


def test_evaluate_classifier_writes_table_and_json(cls_ckpt, synth_dir, tmp_path):
    out = tmp_path / "report.json"
    res = invoke("evaluate", cls_ckpt, "--split", synth_dir / "test_COVIDx_CT.txt", "--json", out, "-q")
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.stdout and "covid19" in res.stdout
    report = json.loads(out.read_text())
    assert report["kind"] == "classifier" and report["n"] == len(report["predictions"])


def test_split_naming_a_missing_image(cls_ckpt, synth_dir, tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("nope.png 2 0 0 10 10\n")
    out = tmp_path / "r.json"
    res = invoke("evaluate", cls_ckpt, "--split", split, "--json", out, "-q")
    assert res.exit_code == 2
    assert "nope.png" in res.output and "does not exist" in res.output and "line 1" in res.output
    assert not out.exists()


def test_corrupt_png_names_the_file(cls_ckpt, synth_dir, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    good = sorted((synth_dir / "images").glob("test_*.png"))[0]
    shutil.copy(good, data / "images" / "good.png")
    (data / "images" / "broken.png").write_bytes(good.read_bytes()[:200])
    split = data / "test.txt"
    split.write_text("good.png 0 0 0 512 512\nbroken.png 1 0 0 512 512\n")
    out = tmp_path / "r.json"
    res = invoke("evaluate", cls_ckpt, "--split", split, "--json", out, "-q")
    assert res.exit_code == 2
    assert "broken.png" in res.output and "cannot decode image" in res.output
    assert not out.exists()


def test_mask_with_unexpected_values(seg_ckpt, synth_dir, tmp_path):
    import numpy as np
    from PIL import Image

    seg = tmp_path / "seg"
    shutil.copytree(synth_dir / "segmentation" / "test", seg)
    mask_path = sorted((seg / "masks").glob("*.png"))[0]
    mask = np.array(Image.open(mask_path))
    mask[:4, :4] = 7
    Image.fromarray(mask).save(mask_path)
    out = tmp_path / "r.json"
    res = invoke("evaluate", seg_ckpt, "--seg-dir", seg, "--json", out, "-q")
    assert res.exit_code == 2
    assert mask_path.name in res.output and "7" in res.output
    assert not out.exists()


def test_train_cls_with_checkpoint_of_wrong_preset(seg_ckpt, synth_dir, tmp_path):
    out = tmp_path / "cls.pt"
    res = invoke("train-cls", seg_ckpt, "--preset", "paper", "--train-split", synth_dir / "train_COVIDx_CT.txt",
                 "--out", out, "--epochs", "1", "-q")
    assert res.exit_code == 2
    assert str(seg_ckpt) in res.output and "preset 'small'" in res.output
    assert not out.exists()


def test_synth_command(tmp_path):
    out = tmp_path / "data"
    res = invoke("synth", out, "--slices", "9", "--seed", "1", "--workers", "1", "--json", tmp_path / "s.json", "-q")
    assert res.exit_code == 0, res.output
    assert "train" in res.stdout and "SYNTHETIC" in res.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert sum(s["n"] for s in summary["splits"].values()) == 9
    assert (out / "train_COVIDx_CT.txt").is_file() and (out / "segmentation" / "test" / "masks").is_dir()
