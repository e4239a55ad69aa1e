"""The typer CLI: JSON outputs, user errors without tracebacks, nothing half-written."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zipfile

import pytest
from tests_helpers import invoke

import ctmask


def test_model_info_paper_json():
    res = invoke("model-info", "--preset", "paper", "--json", "-")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)  # stdout is the JSON alone; the table goes to stderr
    assert info["mask_rcnn_total"] == 31_728_744 and info["classifier_s"] == 2_364_419
    assert "mask_rcnn_total" in res.stderr


def test_model_info_json_takes_a_file_like_every_command(tmp_path):
    out = tmp_path / "info.json"
    res = invoke("model-info", "--preset", "paper", "--json", out)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["mask_rcnn_total"] == 31_728_744
    assert "31,728,744" in res.stdout  # the table still prints
    res = invoke("model-info", "--json")  # a bare --json needs its argument, as elsewhere
    assert res.exit_code == 2 and "requires an argument" in res.output


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


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0, res.output
    assert res.stdout == f"ctmask {ctmask.__version__}\n" and re.fullmatch(r"ctmask \d+\.\d+\.\d+\n", res.stdout)


# ---------------------------------------------------------------- damaged checkpoints


def zip_entries(path):
    """(name, offset of the data, size) of every entry of a ``torch.save`` zip (stored, not deflated)."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            yield info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size


def damaged_copy(src, dst, entry, where, new_bytes=None):
    """Copy of ``src`` with the bytes at ``where`` (offset into the zip entry ``entry``)
    replaced by ``new_bytes`` (default: 64 inverted bytes)."""
    start = next(off for name, off, _ in zip_entries(src) if name == entry)
    raw = bytearray(src.read_bytes())
    pos = start + where
    new_bytes = bytes(b ^ 0xFF for b in raw[pos : pos + 64]) if new_bytes is None else new_bytes
    raw[pos : pos + len(new_bytes)] = new_bytes
    dst.write_bytes(bytes(raw))
    return dst


def corrupt_weights(src, dst):
    """64 bytes inverted in the middle of the checkpoint's largest tensor (a detector weight)."""
    name, _, size = max((e for e in zip_entries(src) if "/data/" in e[0]), key=lambda e: e[2])
    return damaged_copy(src, dst, name, size // 2)


def test_corrupted_weights_are_caught_on_load(cls_ckpt, tmp_path):
    import torch

    from ctmask.core.errors import CheckpointError
    from ctmask.training.checkpoint import load_checkpoint

    bad = corrupt_weights(cls_ckpt, tmp_path / "bad.pt")
    # torch reads the damaged tensor without a complaint: only the digest can tell.
    damaged, good = torch.load(bad, weights_only=True), torch.load(cls_ckpt, weights_only=True)
    assert [k for k in good["model"] if not torch.equal(damaged["model"][k], good["model"][k])]
    with pytest.raises(CheckpointError, match="checkpoint corrupt: weights damaged") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)


def test_corrupted_weights_stop_export_and_evaluate(cls_ckpt, synth_dir, tmp_path):
    bad = corrupt_weights(cls_ckpt, tmp_path / "bad.pt")
    for args in (("export", bad, "--out", tmp_path / "m.onnx"),
                 ("evaluate", bad, "--split", synth_dir / "test_COVIDx_CT.txt", "--json", tmp_path / "r.json", "-q")):
        res = invoke(*args)
        assert res.exit_code == 2, res.output
        assert str(bad) in res.output and "checkpoint corrupt: weights damaged" in res.output
        assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_damaged_header_or_truncation_is_a_clear_error(cls_ckpt, synth_dir, tmp_path):
    import torch

    from ctmask.core.errors import CheckpointError
    from ctmask.training.checkpoint import load_checkpoint

    pickle_entry, _, pickle_size = next(e for e in zip_entries(cls_ckpt) if e[0].endswith("/data.pkl"))
    # A pickle opcode that fetches a memo entry which does not exist: torch raises a bare KeyError.
    memo = damaged_copy(cls_ckpt, tmp_path / "memo.pt", pickle_entry, 2, b"h\xfe")
    with pytest.raises(KeyError):
        torch.load(memo, weights_only=True)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(cls_ckpt.read_bytes()[: cls_ckpt.stat().st_size * 3 // 5])
    garbled = damaged_copy(cls_ckpt, tmp_path / "garbled.pt", pickle_entry, pickle_size // 2)
    for path in (memo, truncated, garbled):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="cannot read checkpoint.*KeyError"):
        load_checkpoint(memo)
    for path in (memo, truncated):
        res = invoke("evaluate", path, "--split", synth_dir / "test_COVIDx_CT.txt", "-q")
        assert res.exit_code == 2 and "cannot read checkpoint" in res.output and "Traceback" not in res.output


def pickle_of(path):
    """(name, size) of the ``*/data.pkl`` entry of a ``torch.save`` zip."""
    return next((name, size) for name, _, size in zip_entries(path) if name.endswith("/data.pkl"))


def edited_pickle(src, dst, old, new):
    """Copy of ``src`` with ``old`` replaced by ``new`` (same length) in its ``data.pkl``:
    the zip is rewritten with the same entry names, so the pickle stays valid and
    ``torch.load`` reads the edited value without a complaint."""
    assert len(old) == len(new)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                assert data.count(old) == 1, old
                data = data.replace(old, new)
            zout.writestr(info, data)
    return dst


def assert_export_refuses(bad, tmp_path, match):
    """``ctmask export`` of a damaged checkpoint: exit 2, the file and ``match`` named, no
    traceback, nothing written."""
    out = tmp_path / "export"
    res = invoke("export", bad, "--out", out / "m.onnx")
    assert res.exit_code == 2, res.output
    assert str(bad) in res.output and match in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_checkpoint_format_and_digests(cls_ckpt):
    import torch

    from ctmask.training.checkpoint import FORMAT, content_digest, load_checkpoint, weights_digest

    blob = torch.load(cls_ckpt, weights_only=True)
    assert blob["format"] == FORMAT == "ctmask-checkpoint/2"
    assert blob["weights_sha256"] == weights_digest(blob["model"])
    assert blob["optimizer_sha256"] == weights_digest(blob["optimizer"])
    assert blob["content_sha256"] == content_digest(
        format=FORMAT, kind=blob["kind"], config=blob["config"], epoch=blob["epoch"],
        weights_sha256=blob["weights_sha256"], optimizer_sha256=blob["optimizer_sha256"])
    assert json.loads(cls_ckpt.with_name(cls_ckpt.name + ".json").read_text())["weights_sha256"] == blob[
        "weights_sha256"]
    assert load_checkpoint(cls_ckpt).verified


@pytest.mark.parametrize(("old", "new"), [
    (b'"rpn_nms_thresh": 0.75', b'"rpn_nms_thresh": 0.15'),  # the detector's NMS
    (b'"level": -600', b'"level": -900'),  # the pre-processing window
    (b'"rpn_post_nms_top_n_test": 300', b'"rpn_post_nms_top_n_test": 100'),  # the preset's top-N
])
def test_a_flipped_digit_in_the_config_is_caught(cls_ckpt, tmp_path, old, new):
    """One digit of the config JSON changed inside data.pkl (the weights untouched): the
    content digest catches it, on load and in ``ctmask export``."""
    import torch

    from ctmask.core.errors import CheckpointError
    from ctmask.training.checkpoint import load_checkpoint

    bad = edited_pickle(cls_ckpt, tmp_path / "bad.pt", old, new)
    damaged, good = torch.load(bad, weights_only=True), torch.load(cls_ckpt, weights_only=True)
    assert damaged["config"] != good["config"] and damaged["weights_sha256"] == good["weights_sha256"]
    with pytest.raises(CheckpointError, match="checkpoint corrupt: config, kind or epoch damaged") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)
    assert_export_refuses(bad, tmp_path, "checkpoint corrupt")


@pytest.mark.parametrize("key", [b"weights_sha256", b"optimizer_sha256", b"content_sha256"])
def test_a_damaged_digest_key_name_is_caught(cls_ckpt, tmp_path, key):
    """A flipped byte in a digest's key name must not switch that check off: the damaged
    name is an unknown entry, and the digest is then missing."""
    import torch

    from ctmask.core.errors import CheckpointError
    from ctmask.training.checkpoint import load_checkpoint

    bad = edited_pickle(cls_ckpt, tmp_path / "bad.pt", key, key[:-1] + b"7")
    assert key.decode() not in torch.load(bad, weights_only=True)
    with pytest.raises(CheckpointError, match=r"checkpoint corrupt: unknown entries \['.*_sha257'\]") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)
    assert_export_refuses(bad, tmp_path, "checkpoint corrupt")
    # A format /2 file without one of its digests (however it was lost) is corrupt, not old.
    blob = torch.load(cls_ckpt, weights_only=True)
    del blob[key.decode()]
    torch.save(blob, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint corrupt: {key.decode()} missing"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_damaged_optimizer_state_is_caught(cls_ckpt, tmp_path):
    """64 bytes inverted in the optimizer's largest tensor (the model untouched)."""
    import torch

    from ctmask.core.errors import CheckpointError
    from ctmask.training.checkpoint import load_checkpoint, weights_digest

    good = torch.load(cls_ckpt, weights_only=True)
    # torch.save numbers the storages in pickling order: the model's come first.
    n_model = len(good["model"])
    entries = [e for e in zip_entries(cls_ckpt) if "/data/" in e[0] and int(e[0].rsplit("/", 1)[1]) >= n_model]
    name, _, size = max(entries, key=lambda e: e[2])
    bad = damaged_copy(cls_ckpt, tmp_path / "bad.pt", name, size // 2)
    damaged = torch.load(bad, weights_only=True)
    assert all(torch.equal(damaged["model"][k], v) for k, v in good["model"].items())
    assert weights_digest(damaged["optimizer"]) != weights_digest(good["optimizer"])
    with pytest.raises(CheckpointError, match="checkpoint corrupt: optimizer state damaged") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)
    assert_export_refuses(bad, tmp_path, "checkpoint corrupt")


def test_format_1_checkpoints_still_load_with_a_warning(cls_ckpt, synth_dir, tmp_path):
    """Files of format ctmask-checkpoint/1 (no content digest; the oldest no digest at all)
    load with a one-line warning that they cannot be fully verified; what digests they
    carry are still checked, and a config that cannot be interpreted names the file."""
    import torch

    from ctmask.core.errors import CheckpointError, CtmaskWarning
    from ctmask.training.checkpoint import LEGACY_FORMAT, load_checkpoint

    good = load_checkpoint(cls_ckpt)
    blob = torch.load(cls_ckpt, weights_only=True)
    blob["format"] = LEGACY_FORMAT
    del blob["content_sha256"]
    v1 = tmp_path / "v1.pt"
    torch.save(blob, v1)
    with pytest.warns(CtmaskWarning, match="config, kind and epoch cannot be checked"):
        ck = load_checkpoint(v1)
    assert not ck.verified and ck.weights_sha256 == good.weights_sha256 and ck.preset == good.preset
    with pytest.raises(CheckpointError, match="checkpoint corrupt: weights damaged"):
        load_checkpoint(corrupt_weights(v1, tmp_path / "v1_bad.pt"))
    # The oldest: no digests, and no pre-processing record beside the crop option.
    del blob["weights_sha256"], blob["optimizer_sha256"]
    cfg = json.loads(blob["config"])
    assert cfg.pop("preprocess") == {"crop": False, "resize": "bilinear", "window": {"level": -600.0, "width": 1500.0}}
    cfg["train"]["crop"] = True
    blob["config"] = json.dumps(cfg)
    old = tmp_path / "old.pt"
    torch.save(blob, old)
    with pytest.warns(CtmaskWarning, match="no weights digest"):
        ck = load_checkpoint(old)
    assert not ck.verified and ck.weights_sha256 == good.weights_sha256
    assert ck.preprocessing.crop  # taken from the training option
    res = invoke("evaluate", old, "--split", synth_dir / "test_COVIDx_CT.txt", "-q", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert re.search(r"^warning: .*old\.pt: checkpoint has no weights digest", res.stderr, re.M)
    # Such a file cannot tell a damaged config; one that cannot be interpreted names the file.
    for old_bytes, new_bytes, match in ((b'"n_rois": 64', b'"n_xois": 64', r"unknown fields \['n_xois'\]"),
                                        (b'"n_rois": 64', b'"n_rois":"4"', "preset.n_rois must be of type int"),
                                        (b'"preset": {', b'"preset": [', "JSONDecodeError")):
        bad = edited_pickle(v1, tmp_path / "bad.pt", old_bytes, new_bytes)
        with pytest.raises(CheckpointError, match=match) as err:
            load_checkpoint(bad)
        assert str(bad) in str(err.value) and "checkpoint config is malformed" in str(err.value)
    assert_export_refuses(bad, tmp_path, "checkpoint config is malformed")


# ---------------------------------------------------------------- --json -


def test_json_to_stdout_is_the_only_stdout(seg_ckpt, cls_ckpt, synth_dir, tmp_path):
    """With ``--json -`` stdout carries the JSON alone (human output goes to stderr)."""
    test_split = synth_dir / "test_COVIDx_CT.txt"
    runs = {
        "synth": ("synth", tmp_path / "data", "--slices", "6", "--workers", "1", "--json", "-"),
        "train-seg": ("train-seg", synth_dir / "segmentation" / "train", "--out", tmp_path / "seg.pt", "--epochs",
                      "1", "-b", "4", "--max-images", "4", "--json", "-", "-q"),
        "train-cls": ("train-cls", seg_ckpt, "--train-split", test_split, "--out", tmp_path / "cls.pt",
                      "--variant", "heads", "--epochs", "1", "-b", "4", "--json", "-", "-q"),
        "evaluate classifier": ("evaluate", cls_ckpt, "--split", test_split, "--json", "-"),
        "evaluate segmentation": ("evaluate", seg_ckpt, "--seg-dir", synth_dir / "segmentation" / "test",
                                  "--json", "-"),
    }
    for what, args in runs.items():
        res = invoke(*args)
        assert res.exit_code == 0, (what, res.output)
        report = json.loads(res.stdout)  # nothing but the JSON
        assert isinstance(report, dict) and report, what
    assert "accuracy" in res.stderr or "AP" in res.stderr  # the table still reaches the terminal
    res = invoke("evaluate", cls_ckpt, "--split", test_split, "--json", "-", "-q")
    assert "accuracy" in json.dumps(json.loads(res.stdout)) and "sensitivity" in res.stderr
    info = json.loads(invoke("model-info", "--json", "-").stdout)
    assert info["total"] > 0
