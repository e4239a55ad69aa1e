"""`import-reference`: the authors' checkpoint files, built here in their format from ctmask models.

The real files cannot be downloaded here; :mod:`authors_format` writes them as the reference's
scripts do (legacy format, torchvision 0.3 key names, S as ``s2new``, the anchor generator a
pickled object of a class in a module named like the authors'). That throwaway module is gone from
``sys.modules`` before the import reads the file.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
from pathlib import Path

import pytest
import torch
from authors_format import write_authors_file

from ctmask.core.errors import CheckpointError
from ctmask.core.presets import PAPER, PAPER_MERGE, PRESETS, RESNET18_T1, Preset
from ctmask.training.checkpoint import load_checkpoint
from ctmask.training.model import CovidCTMaskNet, load_weights
from ctmask.training.reference_import import ImportOptions, import_reference, read_reference


def _model(preset: Preset, seed: int) -> CovidCTMaskNet:
    torch.manual_seed(seed)
    model = CovidCTMaskNet(preset).eval()
    # Random BN statistics, so a statistic lost or swapped in the import would show.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


CASES = [(PAPER, "segmentation", None), (PAPER_MERGE, "classifier", "merge"),
         (RESNET18_T1, "segmentation", "merge"), (dataclasses.replace(RESNET18_T1, mask_type="both",
                                                                      num_lesion_classes=3), "classifier", None)]


@pytest.mark.parametrize(("preset", "kind", "mask_type"), CASES, ids=["paper-seg-both", "paper-cls-merge",
                                                                      "r18t1-seg-merge", "r18t1-cls-both"])
def test_imported_model_equals_source(tmp_path, preset, kind, mask_type):
    source = _model(preset, seed=len(preset.name))
    src = tmp_path / "authors.pth"
    write_authors_file(src, source, kind)
    assert src.read_bytes()[:2] != b"PK"  # the legacy format, as torch 1.1 wrote it
    assert "models.mask_net.rpn" not in sys.modules
    summary = import_reference(src, tmp_path / "ctmask.pt", ImportOptions(mask_type=mask_type))
    ck = load_checkpoint(tmp_path / "ctmask.pt", kind=kind)
    assert ck.verified and summary["kind"] == kind
    assert ck.config["import_reference"]["source_sha256"] == summary["source_sha256"]
    expected = dataclasses.replace(preset, name=ck.preset.name)
    assert ck.preset == expected
    # A preset of the named ones is recognised by name; any other gets a name spelling it out.
    assert ck.preset.name == (preset.name if preset in PRESETS.values() else "resnet18-t1-both-n128-s512")
    imported = CovidCTMaskNet(ck.preset).eval()
    if kind == "segmentation":
        imported.detector.load_state_dict(ck.model)
        imported.classifier = source.classifier  # the classifier is trained later
    else:
        load_weights(imported, ck.model, ck.path)
    for (k, a), b in zip(source.detector.state_dict().items(), imported.detector.state_dict().values()):
        if kind == "segmentation" or ".mask_" not in k:
            assert torch.equal(a, b), k
        else:  # not in a classifier file: zeros, as the import records
            assert not b.any(), k
    # Same outputs, exactly: at the model's 512 x 512 for the lightweight classifier, on a small
    # input otherwise (the same weights and architecture; the paper model costs seconds at 512).
    size = 512 if preset.name == "resnet18-t1" and kind == "classifier" else 96
    small = dataclasses.replace(ck.preset, image_size=size)
    a_model, b_model = CovidCTMaskNet(small, source.detector).eval(), CovidCTMaskNet(small, imported.detector).eval()
    a_model.classifier, b_model.classifier = source.classifier, imported.classifier
    x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (ra, la), (rb, lb) = a_model(x), b_model(x)
    assert (ra[..., 0] > 0).any()
    assert torch.equal(ra, rb) and torch.equal(la, lb)


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    """A resnet18-t1 segmentation file in the authors' format, and its source model."""
    folder = tmp_path_factory.mktemp("authors")
    model = _model(RESNET18_T1, seed=1)
    write_authors_file(folder / "lightweight_segmentation_model_resnet18_t1.pth", model, "segmentation")
    return folder / "lightweight_segmentation_model_resnet18_t1.pth", model


def _altered(r18_file, tmp_path, change) -> Path:
    blob = read_reference(r18_file[0])
    change(blob["model_weights"])
    blob["anchor_generator"] = None
    path = tmp_path / "altered.pth"
    torch.save(blob, path, _use_new_zipfile_serialization=False)
    return path


class _Payload:
    """Unpickling it calls ``exec``, which would write the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_a_code_running_pickle_is_refused_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model_weights": {}, "anchor_generator": _Payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"refused: the file pickles (builtins\.)?exec,") as exc:
        import_reference(path, tmp_path / "out.pt")
    assert str(path) in str(exc.value)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    torch.load(path, weights_only=False)  # what the payload does when unpickled by a plain load
    assert marker.read_text() == "ran"


def test_refusals_name_the_problem(tmp_path, r18_file):
    src = r18_file[0]
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read the file: damaged, truncated"):
        import_reference(truncated, tmp_path / "a.pt", ImportOptions(mask_type="merge"))

    def drop(w):
        del w["rpn.head.bbox_pred.bias"]

    def widen(w):
        w["roi_heads.box_head.fc7.weight"] = torch.zeros(128, 129)

    def extra(w):
        w["roi_heads.box_head.fc8.weight"] = torch.zeros(1)

    for change, message in ((drop, r"missing keys: detector\.rpn\.head\.bbox_pred\.bias"),
                            (widen, r"shape mismatches: detector\.roi_heads\.box_head\.fc7\.weight is \[128, 129\]"),
                            (extra, r"unknown keys: roi_heads\.box_head\.fc8\.weight")):
        with pytest.raises(CheckpointError, match=message):
            import_reference(_altered(r18_file, tmp_path, change), tmp_path / "b.pt", ImportOptions(mask_type="merge"))
    with pytest.raises(CheckpointError, match="give --mask-type ggo or --mask-type merge"):
        import_reference(src, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="--backbone resnet34 contradicts the file"):
        import_reference(src, tmp_path / "c.pt", ImportOptions(backbone="resnet34", mask_type="merge"))
    assert not list(tmp_path.glob("*.pt"))


def test_a_zip_format_file_imports_the_same(tmp_path, r18_file):
    """A file re-saved by a newer torch (zip format) is read by ``torch.load(weights_only=True)``."""
    zipped = tmp_path / "zipped.pth"
    write_authors_file(zipped, r18_file[1], "segmentation", legacy=False)
    assert zipped.read_bytes()[:2] == b"PK"
    a = import_reference(zipped, tmp_path / "a.pt", ImportOptions(mask_type="merge"))
    b = import_reference(r18_file[0], tmp_path / "b.pt", ImportOptions(mask_type="merge"))
    assert a["preset"] == b["preset"] and a["source_sha256"] != b["source_sha256"]
    assert load_checkpoint(tmp_path / "a.pt").weights_sha256 == load_checkpoint(tmp_path / "b.pt").weights_sha256


def test_cli_imports_a_segmentation_file_for_train_cls(tmp_path, r18_file):
    from typer.testing import CliRunner

    from ctmask.cli.main import app
    from ctmask.training.train_cls import init_model

    out = tmp_path / "seg.pt"
    res = CliRunner().invoke(app, ["import-reference", str(r18_file[0]), "--out", str(out), "--mask-type", "merge"])
    assert res.exit_code == 0, res.output
    assert "preset 'resnet18-t1'" in res.output and "n_rois 128 (default of resnet18-t1)" in res.output
    start = init_model(RESNET18_T1, out, "heads+bn")  # what `train-cls --preset resnet18-t1` starts from
    assert torch.equal(start.model.detector.roi_heads.mask_head[0][0].weight,
                       r18_file[1].detector.roi_heads.mask_head[0][0].weight)
    res = CliRunner().invoke(app, ["import-reference", str(r18_file[0]), "--out", str(out)])
    assert res.exit_code != 0 and "--mask-type" in res.output and "Traceback" not in res.output


def test_declared_storage_sizes_are_checked_before_torch_allocates(tmp_path):
    """torch's legacy reader allocates each storage at its declared size before reading it, and fills
    only the listed ones: a small file declaring terabytes, or a storage it never fills (uninitialised
    memory imported as weights, a gigabyte checkpoint from a kilobyte file), is refused first."""
    from authors_format import write_crafted_legacy

    t = torch.arange(6.0)
    ptr = t.untyped_storage().data_ptr()
    ok = tmp_path / "ok.pth"
    write_crafted_legacy(ok, {"model_weights": {"a": t}})
    assert torch.equal(read_reference(ok)["model_weights"]["a"], t)  # the writer is torch's format
    for name, kw, message in (
            ("huge.pth", {"numel": {ptr: 10**12}}, r"storages of 4,000,000,000,000 bytes"),
            ("bomb.pth", {"numel": {ptr: 10**12}, "unlisted": (ptr,)}, "nothing allocated"),
            ("unfilled.pth", {"unlisted": (ptr,)}, "that are not in the file's storage list"),
            ("module.pth", {"module_record": collections.OrderedDict}, "nn.Module record of a class other than")):
        path = tmp_path / name
        write_crafted_legacy(path, {"model_weights": {"a": t}, "anchor_generator": torch.nn.Identity()}
                             if name == "module.pth" else {"model_weights": {"a": t}}, **kw)
        with pytest.raises(CheckpointError, match=message) as exc:
            read_reference(path)
        assert str(exc.value).startswith(f"{path}: " + ("cannot read the file: damaged, truncated" if "numel" in kw
                                                        else "refused: the file declares"))


def test_a_compressed_zip_is_refused_before_it_is_unpacked(tmp_path):
    """torch reads deflated records too: a 200 kB archive can unpack to 200 MB (or 16 GB from 16 MB)."""
    import zipfile

    plain, packed = tmp_path / "plain.pth", tmp_path / "packed.pth"
    torch.save({"model_weights": {"a": torch.zeros(1_000_000)}}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert torch.load(packed, weights_only=True)["model_weights"]["a"].numel() == 1_000_000  # torch unpacks it
    assert read_reference(plain)["model_weights"]["a"].numel() == 1_000_000
    with pytest.raises(CheckpointError, match=r"unpacks to 4,000,\d+ bytes from [\d,]+ .*nothing unpacked"):
        read_reference(packed)


def test_weights_of_another_dtype_or_not_finite_are_refused_by_name(tmp_path, r18_file):
    """The shapes fit, the values cannot be a model's: int / bool / complex weights, NaN and inf
    (float64 ones past float32's range too) are refused, each named; float16 imports as float32."""

    def put(key, value):
        return lambda w: w.__setitem__(key, value(w[key]))

    conv = "backbone.body.conv1.weight"
    for change, message in (
            (put(conv, lambda t: t.to(torch.int32)), r"never saves: detector\.backbone\.body\.conv1\.weight \(int32\)"),
            (put(conv, lambda t: t > 0), r"never saves: detector\.backbone\.body\.conv1\.weight \(bool\)"),
            (put(conv, lambda t: t.to(torch.complex64)), r"\(complex64\)"),
            (put("backbone.body.bn1.num_batches_tracked", lambda t: t.float()), r"num_batches_tracked \(float32\)"),
            (put("rpn.head.cls_logits.bias", lambda t: torch.full_like(t, float("nan"))),
             r"NaN or infinite \(in float32\): detector\.rpn\.head\.cls_logits\.bias \(30 of 30\)"),
            (put("rpn.head.cls_logits.bias", lambda t: t.double().index_fill(0, torch.tensor([3]), 1e300)),
             r"NaN or infinite \(in float32\): detector\.rpn\.head\.cls_logits\.bias \(1 of 30\)")):
        with pytest.raises(CheckpointError, match=message):
            import_reference(_altered(r18_file, tmp_path, change), tmp_path / "b.pt", ImportOptions(mask_type="merge"))
    assert not list(tmp_path.glob("*.pt"))
    half = _altered(r18_file, tmp_path, put(conv, lambda t: t.half()))
    import_reference(half, tmp_path / "half.pt", ImportOptions(mask_type="merge"))
    weight = load_checkpoint(tmp_path / "half.pt").model["backbone.body.conv1.weight"]
    source = r18_file[1].detector.backbone.body.conv1.weight
    assert weight.dtype == torch.float32 and torch.equal(weight, source.half().float())


def test_anchors_that_are_not_the_references_kind_of_number_are_refused(tmp_path, r18_file):
    """Sizes are positive ints, ratios positive finite numbers: 2.7 was truncated to 2 (and the
    file imported as the named preset), "2" and True read as numbers, 0, -2 and NaN accepted."""
    from authors_format import save_authors_blob

    blob = read_reference(r18_file[0])
    del blob["anchor_generator"]
    ratios = (0.1, 0.25, 0.5, 1, 1.5, 2)
    for sizes, aspect in (((2.7, 4, 8, 16, 32), ratios), (("2", 4, 8, 16, 32), ratios), ((True, 4, 8, 16, 32), ratios),
                          ((0, 4, 8, 16, 32), ratios), ((-2, 4, 8, 16, 32), ratios),
                          ((2, 4, 8, 16, 32), (float("nan"), 0.25, 0.5, 1, 1.5, 2)),
                          ((2, 4, 8, 16, 32), (0.1, 0.25, 0.5, 1, 1.5, float("inf")))):
        path = tmp_path / "anchors.pth"
        save_authors_blob(path, blob, "segmentation", (sizes,), (aspect,))
        with pytest.raises(CheckpointError, match="sizes / aspect_ratios are not positive whole numbers"):
            import_reference(path, tmp_path / "a.pt", ImportOptions(mask_type="merge"))
    save_authors_blob(path, blob, "segmentation", ((2.0, 4, 8, 16, 32),), (ratios,))  # a whole float is a size
    summary = import_reference(path, tmp_path / "a.pt", ImportOptions(mask_type="merge"))
    assert summary["preset"]["name"] == "resnet18-t1"


def test_n_rois_and_s_width_below_one_are_refused(tmp_path, r18_file):
    """--n-rois 0 fell back to the default silently (``or``), -5 made a preset 'resnet18-t1-merge-n-5-s512'."""
    for opts, message in ((ImportOptions(mask_type="merge", n_rois=0), "--n-rois 0: expected a whole number"),
                          (ImportOptions(mask_type="merge", n_rois=-5), "--n-rois -5"),
                          (ImportOptions(mask_type="merge", s_width=0), "--s-width 0")):
        with pytest.raises(CheckpointError, match=message):
            import_reference(r18_file[0], tmp_path / "a.pt", opts)
    assert not (tmp_path / "a.pt").exists()


def test_bytes_that_are_no_pickle_are_damaged_not_refused_as_code(tmp_path, r18_file):
    """Random bytes, a text file or a pickle cut short were reported as "refused: the file pickles
    invalid load key, ..., unpickling it could run code"; a folder as "file does not exist"."""
    data = r18_file[0].read_bytes()
    cases = {"random.pth": bytes(range(256)) * 20, "notes.pth": b"model weights: see the README\n" * 40,
             "cut.pth": data[:900]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="cannot read the file: damaged, truncated") as exc:
            read_reference(tmp_path / name)
        assert "could run code" not in str(exc.value)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        read_reference(tmp_path)


def test_a_file_recording_the_anchor_class_source_imports(tmp_path, r18_file, monkeypatch):
    """torch 1.1 recorded the anchor class's source (the reference's rpn.py) in every file; torch's
    legacy reader compares it with the stand-in's and then reads ``dump_patches``, which the stand-in
    lacked: every real file stopped with "AttributeError: ... 'dump_patches'". No patch file either."""
    from authors_format import REFERENCE_SOURCE

    monkeypatch.chdir(tmp_path)
    assert REFERENCE_SOURCE[2].encode() in r18_file[0].read_bytes()  # the source is in the file, as in theirs
    blob = read_reference(r18_file[0])
    assert blob["anchor_generator"].sizes[0] == (2, 4, 8, 16, 32)
    assert not list(tmp_path.iterdir())  # no RecordedAnchors.patch


def test_meta_sparse_and_quantized_tensors_are_refused_by_name(tmp_path):
    """torch's weights-only reader rebuilds them from a zip-format file; a meta or sparse weight of the
    right shape stopped the import with a RuntimeError / NotImplementedError traceback."""
    for name, tensor in (("meta", torch.empty(4, 4, device="meta")), ("sparse_coo", torch.eye(4).to_sparse()),
                         ("qint8", torch.quantize_per_tensor(torch.eye(4), 0.1, 0, torch.qint8))):
        path = tmp_path / f"{name}.pth"
        torch.save({"model_weights": {"rpn.head.conv.weight": tensor}}, path)
        with pytest.raises(CheckpointError, match=rf"not dense ones with data: \['rpn\.head\.conv\.weight \(.*{name}"):
            read_reference(path)


def test_an_instruction_the_weights_only_reader_refuses_is_named(tmp_path):
    """A zip whose pickle uses INST (protocol 0's call-a-class) was refused as "the file pickles 105"."""
    import zipfile

    plain, crafted = tmp_path / "plain.pth", tmp_path / "inst.pth"
    torch.save({"a": 1}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, b"(ios\nsystem\n." if info.filename.endswith("data.pkl")
                         else src.read(info.filename))
    with pytest.raises(CheckpointError, match=r"pickles the pickle instruction INST \(opcode 105, not run by torch's"):
        read_reference(crafted)


def test_a_shape_of_another_rank_in_a_key_the_model_is_read_from_is_refused(tmp_path, r18_file):
    """The shapes the model is inferred from were unpacked unchecked: a 1-D s2new.fc_scores.weight
    stopped with ValueError, a 0-d cls_score.weight with IndexError (tracebacks), and an empty
    [512, 0] one inferred N = 0 and imported."""
    blob = read_reference(r18_file[0])
    weights = {k: v for k, v in blob["model_weights"].items()}
    for key, value, shown in (("s2new.fc_scores.weight", torch.zeros(512), r"\[512\]"),
                              ("s2new.fc_scores.weight", torch.zeros(512, 0), r"\[512, 0\]"),
                              ("roi_heads.box_predictor.cls_score.weight", torch.tensor(1.0), r"\[\]"),
                              ("rpn.head.cls_logits.weight", torch.zeros(30, 256, 1), r"\[30, 256, 1\]")):
        path = tmp_path / "rank.pth"
        torch.save({"model_weights": {**weights, key: value}}, path, _use_new_zipfile_serialization=False)
        with pytest.raises(CheckpointError, match=rf"{re.escape(key)} is {shown}: the reference's is a \d-dim"):
            import_reference(path, tmp_path / "a.pt", ImportOptions(mask_type="merge"))
    assert not (tmp_path / "a.pt").exists()


def test_train_cls_takes_the_spelled_out_preset_the_import_printed(tmp_path, r18_file):
    """docs/authors-models.md: `train-cls seg.pt --preset <the preset the import printed>`; for a model
    no named preset equals (here --n-rois 64) that name was refused as an unknown preset."""
    from ctmask.core.errors import ConfigError
    from ctmask.training.train_cls import init_model, preset_for_init

    out = tmp_path / "seg.pt"
    name = import_reference(r18_file[0], out, ImportOptions(mask_type="merge", n_rois=64))["preset"]["name"]
    assert name == "resnet18-t1-merge-n64-s512"
    preset = preset_for_init(name, out)
    assert preset.n_rois == 64 and preset_for_init("resnet18-t1", out) == RESNET18_T1
    assert init_model(preset, out, "heads+bn").model.classifier.net[0].in_features == 64 * 5
    with pytest.raises(ConfigError, match=r"unknown preset 'resnet18-t1-merge-n65-s512'; .* the init checkpoint's"):
        preset_for_init("resnet18-t1-merge-n65-s512", out)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_torch_1_1_module_backend_in_the_anchor_generator_is_read(tmp_path, r18_file, legacy):
    """torch 1.1's nn.Module held ``_backend``, pickled as a call of
    ``torch.nn.backends.thnn._get_thnn_function_backend``: the allow-list refused every real file
    ("refused: the file pickles torch.nn.backends.thnn._get_thnn_function_backend")."""
    from authors_format import save_authors_blob

    path = tmp_path / "torch11.pth"
    blob = read_reference(r18_file[0])
    save_authors_blob(path, blob, "segmentation", ((2, 4, 8, 16, 32),), ((0.1, 0.25, 0.5, 1, 1.5, 2),), legacy)
    assert b"_get_thnn_function_backend" in (path.read_bytes() if legacy else
                                             __import__("zipfile").ZipFile(path).read("torch11/data.pkl"))
    assert read_reference(path)["anchor_generator"].sizes == ((2, 4, 8, 16, 32),)


def test_an_epoch_that_is_no_number_is_not_recorded(tmp_path, r18_file):
    """The epoch was recorded as str(blob["epoch"]): lists nested 5000 deep (10 kB of pickle) stopped
    the import with a RecursionError traceback."""
    import struct

    blob = read_reference(r18_file[0])
    path = tmp_path / "deep.pth"
    torch.save({**blob, "anchor_generator": None, "epoch": "EPOCHMARK"}, path, _use_new_zipfile_serialization=False)
    mark = b"X" + struct.pack("<I", 9) + b"EPOCHMARK"
    assert path.read_bytes().count(mark) == 1
    path.write_bytes(path.read_bytes().replace(mark, b"(" * 5000 + b"l" * 5000))
    summary = import_reference(path, tmp_path / "a.pt", ImportOptions(mask_type="merge"))
    assert summary["source_epoch"] is None
    assert import_reference(r18_file[0], tmp_path / "b.pt", ImportOptions(mask_type="merge"))["source_epoch"] == "100"


def test_deeply_nested_entries_are_named_without_recursion(tmp_path):
    """Keys and anchors were put into messages with str() / repr(): a model_weights key of tuples nested
    5000 deep stopped the import with a RecursionError traceback."""
    import struct

    path = tmp_path / "deep.pth"
    torch.save({"model_weights": {"KEYMARK00": torch.zeros(1)}}, path, _use_new_zipfile_serialization=False)
    mark = b"X" + struct.pack("<I", 9) + b"KEYMARK00"
    path.write_bytes(path.read_bytes().replace(mark, b"(" * 5000 + b"t" * 5000))
    with pytest.raises(CheckpointError, match=r"entries that are not tensors: \['\(\(\(\(\(\.\.\.\),\),\),\),\)'\]"):
        read_reference(path)


def test_import_from_python_never_writes_over_its_source(tmp_path, r18_file):
    import shutil

    from ctmask.core.errors import CtmaskError
    from ctmask.training.reference_import import import_reference

    src = tmp_path / "authors.pth"
    shutil.copy(r18_file[0], src)
    before = src.read_bytes()
    for out in (src, tmp_path / "." / "authors.pth", tmp_path / "authors.pth.json" / ".." / "authors.pth"):
        with pytest.raises(CtmaskError, match="input"):
            import_reference(src, out)
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["authors.pth"]
