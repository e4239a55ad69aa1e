"""Triton model repositories: `ctmask export ... --triton-repo DIR` and `ctmask check-triton DIR`.

No Triton server runs here: configs are checked by parsing them with Triton's own protobuf
schema (tritonclient's ModelConfig) and against the ONNX graph, read independently with onnx.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tests_helpers import invoke
from tritonclient.grpc import model_config_pb2 as mc

from ctmask.core.errors import ConfigError, CtmaskError
from ctmask.core.spec import GraphSpec
from ctmask.scale.triton_check import check_triton_repo
from ctmask.scale.triton_write import write_triton_repo

OPTS = dict(max_batch=None, instances=1, kind="gpu", max_queue_delay_us=500, version=None)


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def graph_io(path: Path):
    """The graph's own inputs / outputs, read with onnx alone: name -> (elem type, dims, -1 symbolic)."""
    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}

    def one(v):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        return v.type.tensor_type.elem_type, dims

    return ({v.name: one(v) for v in proto.graph.input if v.name not in inits},
            {v.name: one(v) for v in proto.graph.output},
            {p.key: p.value for p in proto.metadata_props})


def edited_graph(src: Path, dst: Path, **meta: str) -> Path:
    """Copy of ``src`` with metadata_props entries replaced."""
    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key in meta:
            prop.value = meta[prop.key]
    onnx.save(proto, str(dst))
    return dst


@pytest.fixture(scope="module")
def graph_repo(small_onnx, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_triton_repo(repo, "small", small_onnx, None, **OPTS)
    return repo


@pytest.fixture()
def repo_copy(graph_repo, tmp_path):
    dst = tmp_path / "repo"
    shutil.copytree(graph_repo, dst)
    return dst


def test_graph_config_parses_with_tritons_schema_and_matches_the_graph(graph_repo, small_onnx):
    folder = graph_repo / "small"
    config = parse(folder / "config.pbtxt")
    assert (config.name, config.platform, config.backend) == ("small", "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 32 and list(config.dynamic_batching.preferred_batch_size) == [32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, mc.ModelInstanceGroup.KIND_GPU)]
    assert config.version_policy.latest.num_versions == 1
    inputs, outputs, meta = graph_io(small_onnx)
    spec = GraphSpec.from_metadata(meta, small_onnx)
    shapes = {"images": spec.input_shape(), **spec.output_shapes()}
    for entries, declared in ((config.input, inputs), (config.output, outputs)):
        assert [e.name for e in entries] == list(declared)
        for e in entries:
            elem, dims = declared[e.name]
            assert elem == onnx.TensorProto.FLOAT and e.data_type == mc.TYPE_FP32
            assert dims[0] == -1  # the batch: symbolic in the graph, left out of dims (max_batch_size > 0)
            assert list(e.dims) == dims[1:] == list(shapes[e.name][1:])
    assert [o.label_filename for o in config.output] == ["", "", "labels.txt", "", ""]
    assert (folder / "labels.txt").read_text().splitlines() == list(spec.class_names)
    model = folder / "1" / "model.onnx"
    assert model.read_bytes() == small_onnx.read_bytes()
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["ctmask.v1.sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert params["ctmask.format"] == meta["ctmask.format"] and params["ctmask.v1.precision"] == "fp32"
    assert sorted(p.name for p in graph_repo.iterdir()) == ["small"]  # no temporary folder left
    assert check_triton_repo(graph_repo) == []


def test_cli_packages_a_graph_and_check_triton_passes(small_onnx, tmp_path):
    repo = tmp_path / "models"
    r = invoke("export", small_onnx, "--triton-repo", repo, "--triton-max-batch", 16, "--triton-kind", "cpu",
               "--triton-instances", 2, "--triton-delay-us", 100, "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "e.json").read_text())["triton"]["models"]
    assert [(m["model"], m["version"], m["status"]) for m in summary] == [("small", 1, "written")]
    config = parse(repo / "small" / "config.pbtxt")
    assert config.max_batch_size == 16 and config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    r = invoke("check-triton", repo, "--json", tmp_path / "c.json")
    assert r.exit_code == 0 and "no findings" in r.output, r.output
    assert json.loads((tmp_path / "c.json").read_text())["passed"] is True


def test_export_from_a_checkpoint_puts_the_new_graph_into_the_repository(cls_ckpt, small_onnx, tmp_path,
                                                                        monkeypatch):
    """What `export CKPT --out F --triton-repo DIR` does after the export. The export itself
    (tested in test_deploy_cli) is replaced by a copy of the fixture's graph, which it wrote."""
    import ctmask.cli.export as export_cli
    from ctmask.exporter.onnx_export import ExportResult

    def exported(checkpoint, out, precision, *args, **kwargs):
        assert (checkpoint, precision) == (cls_ckpt, "fp32")
        shutil.copyfile(small_onnx, out)
        spec = GraphSpec.from_metadata(graph_io(out)[2], out)
        return ExportResult(out, spec, 0.0, 1, [], out.stat().st_size), None

    monkeypatch.setattr(export_cli, "_export_graph", exported)
    out, repo = tmp_path / "covid model+1.onnx", tmp_path / "repo"
    r = invoke("export", cls_ckpt, "--out", out, "--triton-repo", repo, "-q")
    assert r.exit_code == 0, r.output
    folder = repo / "covid_model_1"  # the --out stem, made a Triton model name
    assert (folder / "1" / "model.onnx").read_bytes() == out.read_bytes()
    assert parse(folder / "config.pbtxt").name == "covid_model_1"
    assert check_triton_repo(repo) == []
    (folder / "config.pbtxt").write_text("garbage {")
    r = invoke("export", cls_ckpt, "--out", tmp_path / "other.onnx", "--triton-repo", repo, "--triton-name",
               "covid_model_1")
    assert r.exit_code == 2 and "config.pbtxt" in r.output, r.output
    assert not (tmp_path / "other.onnx").exists()  # refused before the export


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


FAULTS = {
    "wrong dim": (lambda c: _replace(c, "dims: 64\n  dims: 5", "dims: 63\n  dims: 5"),
                  "output rois: dims [63, 5], the graph declares [64, 5]"),
    "wrong name": (lambda c: _replace(c, 'name: "boxes"', 'name: "bboxes"'), "config output 'bboxes' is not"),
    "wrong type": (lambda c: _replace(c, "name: \"logits\"\n  data_type: TYPE_FP32", "name: \"logits\"\n  "
                                      "data_type: TYPE_FP16"), "output logits: data_type TYPE_FP16"),
    "missing model file": (lambda c: (c.parent / "1" / "model.onnx").unlink(), "version 1 has no model.onnx"),
    "replaced model file": (lambda c: (c.parent / "1" / "model.onnx").write_bytes(b"\0" * 64),
                            "is not the file the config records"),
    "preferred above max": (lambda c: _replace(c, "preferred_batch_size: 32", "preferred_batch_size: 64"),
                            "preferred_batch_size 64 is not within 1..max_batch_size (32)"),
    "no batching": (lambda c: _replace(c, "max_batch_size: 32", "max_batch_size: 0"), "max_batch_size is 0"),
    "wrong labels": (lambda c: (c.parent / "labels.txt").write_text("a\nb\nc\n"), "are not the class names"),
    "name not the folder": (lambda c: _replace(c, 'name: "small"', 'name: "other"'), "is not the folder's name"),
}


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _block(config: Path, kind: str, name: str) -> str:
    """The text of ``config``'s ``kind`` (input / output) entry ``name``."""
    return re.search(rf'^{kind} {{\n  name: "{name}"\n.*?^}}\n', config.read_text(), re.S | re.M).group(0)


def _warmup(config: Path, batch: int = 1, name: str = "images", dims: list[int] | None = None,
            data_type: str = "TYPE_FP32", data: str = "zero_data: true") -> None:
    """Append a model_warmup ``w`` giving input ``name`` (dims: the config's images dims)."""
    dims = dims if dims is not None else list(parse(config).input[0].dims)
    _append(config, f'model_warmup {{\n  name: "w"\n  batch_size: {batch}\n  inputs {{\n    key: "{name}"\n'
                    f'    value {{\n      data_type: {data_type}\n      dims: {dims}\n      {data}\n    }}\n  }}\n}}\n')


def _loop(path: Path) -> None:
    """``path`` made a symbolic link to itself (a loop: ELOOP when followed)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(path.name)


def _model_dir(c: Path) -> None:
    model = c.parent / "1" / "model.onnx"
    model.unlink()
    model.mkdir()


def _other_model_file(c: Path) -> None:
    shutil.copyfile(c.parent / "1" / "model.onnx", c.parent / "1" / "other.onnx")
    _append(c, 'default_model_filename: "other.onnx"\n')


# Faults of files check-triton reads (each a finding naming the file, never a traceback), and of
# config fields ctmask never writes that change what Triton feeds or loads.
FILE_AND_FIELD_FAULTS = {
    "labels not utf-8": (lambda c: (c.parent / "labels.txt").write_bytes(b"normal\npneumon\xe9a\ncovid19\n"),
                         "labels.txt:2: is not UTF-8 text (byte 0xe9 at offset 14: invalid continuation byte)"),
    "config not utf-8": (lambda c: c.write_bytes(b"# caf\xe9\n" + c.read_bytes()),
                         "config.pbtxt:1: is not UTF-8 text (byte 0xe9"),
    "version folder is a file": (lambda c: (c.parent / "2").write_text("x"),
                                 "small/2: is a file, not a version folder: Triton ignores it"),
    "model file is a directory": (_model_dir, "1/model.onnx: is a directory, not a file: version 1's model.onnx"),
    "model file symlink loop": (lambda c: _loop(c.parent / "1" / "model.onnx"),
                                "1/model.onnx: cannot be resolved (OSError: Too many levels of symbolic links)"),
    "labels symlink loop": (lambda c: _loop(c.parent / "labels.txt"), "labels.txt: cannot be resolved (OSError"),
    "labels dangling symlink": (lambda c: ((c.parent / "labels.txt").unlink(),
                                           (c.parent / "labels.txt").symlink_to("gone.txt")),
                                "labels.txt: is a symbolic link to nothing"),
    "config symlink loop": (lambda c: _loop(c), "config.pbtxt: cannot be resolved (OSError"),
    "version folder symlink loop": (lambda c: _loop(c.parent / "2"), "small/2: cannot be resolved (OSError"),
    "model folder symlink loop": (lambda c: _loop(c.parent.parent / "loop"),
                                  "loop: cannot be resolved (OSError: Too many levels of symbolic links): Triton "
                                  "cannot tell whether it is a model folder"),
    "labels outside the model folder": (lambda c: _replace(c, 'label_filename: "labels.txt"',
                                                           'label_filename: "../labels.txt"'),
                                        "label_filename '../labels.txt' points outside the model folder"),
    "duplicate output": (lambda c: _append(c, _block(c, "output", "probs")), "output 'probs' is listed 2 times"),
    "duplicate input": (lambda c: _append(c, _block(c, "input", "images")), "input 'images' is listed 2 times"),
    "input reshape": (lambda c: _replace(c, 'name: "images"\n', 'name: "images"\n  reshape {\n    shape: [1, 36864]\n'
                                                                 '  }\n'),
                      "input images: reshape [1, 36864] is not written by ctmask; Triton would feed the model "
                      "[1, 36864] instead of the [1, 192, 192] a client sends; remove it"),
    "output reshape": (lambda c: _replace(c, 'name: "rois"\n', 'name: "rois"\n  reshape {\n    shape: [320]\n  }\n'),
                       "output rois: reshape [320] is not written by ctmask; Triton would take the model's output as "
                       "[320] and return it as [64, 5]; remove it"),
    "default_model_filename": (_other_model_file,
                               "default_model_filename 'other.onnx' is not written by ctmask; Triton would load "
                               "other.onnx from each version folder instead of model.onnx; remove it"),
    "default_model_filename a path": (lambda c: _append(c, 'default_model_filename: "../1/model.onnx"\n'),
                                      "default_model_filename '../1/model.onnx' is not written by ctmask, and is a "
                                      "path"),
    "cc_model_filenames": (lambda c: _append(c, 'cc_model_filenames {\n  key: "9.0"\n  value: "sm90.onnx"\n}\n'),
                           "cc_model_filenames '9.0': 'sm90.onnx' is not written by ctmask; Triton would load "
                           "sm90.onnx instead of model.onnx on GPUs of compute capability 9.0; remove it"),
    "warmup batch above max": (lambda c: _warmup(c, batch=64),
                               "model_warmup 'w': batch_size 64 is not within 1..max_batch_size (32)"),
    "warmup unknown input": (lambda c: _warmup(c, name="image"), "model_warmup 'w' names input 'image', which is "
                                                                 "not an input of the graph"),
    "warmup wrong dims": (lambda c: _warmup(c, dims=[1, 96, 96]),
                          "model_warmup 'w' input images: dims [1, 96, 96], the graph"),
    "warmup wrong type": (lambda c: _warmup(c, data_type="TYPE_FP16"),
                          "model_warmup 'w' input images: data_type TYPE_FP16"),
    "warmup data file missing": (lambda c: _warmup(c, data='input_data_file: "images.bin"'),
                                 "warmup/images.bin: does not exist: model_warmup 'w' input images reads it"),
}
FAULTS.update(FILE_AND_FIELD_FAULTS)


@pytest.mark.parametrize("fault", FAULTS)
def test_check_triton_catches_an_injected_fault(repo_copy, fault):
    config = repo_copy / "small" / "config.pbtxt"
    inject, message = FAULTS[fault]
    inject(config)
    r = invoke("check-triton", repo_copy)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no traceback
    assert r.exit_code == 1, r.output
    assert message in r.output, r.output


@pytest.mark.parametrize("target", ["1/model.onnx", "labels.txt", "config.pbtxt"])
def test_check_triton_flags_a_file_linked_from_outside_the_repository(repo_copy, tmp_path, target):
    """A symbolic link to a file outside the repository reads fine here, but a Triton container that
    mounts the repository cannot follow it: a finding naming the link and its target. A link that
    stays inside the repository is fine."""
    link = repo_copy / "small" / target
    elsewhere = tmp_path / "elsewhere" / link.name
    elsewhere.parent.mkdir()
    shutil.move(link, elsewhere)
    link.symlink_to(elsewhere)
    found = [f for f in check_triton_repo(repo_copy) if f.path == str(link)]
    assert [f.message for f in found] == [f"is a symbolic link to {elsewhere}, outside the model repository: a Triton "
                                          "container that mounts the repository cannot read it; copy the file into "
                                          "the repository"]
    r = invoke("check-triton", repo_copy)
    assert r.exit_code == 1 and f"{link}: is a symbolic link to {elsewhere}, outside" in r.output, r.output
    inside = repo_copy / ".store" / link.name
    inside.parent.mkdir()
    shutil.move(elsewhere, inside)
    link.unlink()
    link.symlink_to(inside)
    assert check_triton_repo(repo_copy) == []


@pytest.mark.parametrize("target", ["labels.txt", "config.pbtxt", "1/model.onnx", "."])
def test_check_triton_reports_an_unreadable_file_or_folder(repo_copy, monkeypatch, target):
    """An unreadable file (or a model folder that cannot be listed) is a finding naming it. The
    tests run as root, which reads every file: the refusal is injected where files are opened."""
    import builtins
    import io

    denied = os.path.realpath(repo_copy / "small" / target)

    def guard(real):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.path.realpath(path) == denied:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)
        return call

    for owner, name in ((io, "open"), (builtins, "open"), (os, "listdir"), (os, "scandir")):
        monkeypatch.setattr(owner, name, guard(getattr(owner, name)))
    r = invoke("check-triton", repo_copy)
    monkeypatch.undo()
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 1, r.output
    what = "cannot be listed" if target == "." else "unreadable"
    assert f"{denied}: {what} (PermissionError: Permission denied)" in r.output, r.output


def _record_sha(folder: Path) -> None:
    """Record the current sha256 of version 1's model file in ``folder``'s config."""
    config = folder / "config.pbtxt"
    text = config.read_text()
    old = re.search(r'key: "ctmask.v1.sha256"\n  value \{\n    string_value: "([0-9a-f]{64})"', text).group(1)
    config.write_text(text.replace(old, hashlib.sha256((folder / "1" / "model.onnx").read_bytes()).hexdigest()))


def test_check_triton_flags_a_graph_with_external_data(repo_copy):
    folder = repo_copy / "small"
    model = folder / "1" / "model.onnx"
    onnx.save_model(onnx.load(str(model)), str(model), save_as_external_data=True, location="x.data")
    assert (folder / "1" / "x.data").is_file()
    _record_sha(folder)  # as if packaged so: nothing else is wrong
    findings = [str(f) for f in check_triton_repo(repo_copy)]
    assert len(findings) == 1, findings
    assert findings[0].startswith(f"{model}: keeps the weights of ")
    assert "in the external data file 'x.data' (the data file is present in the version folder)" in findings[0]
    (folder / "1" / "x.data").unlink()
    findings = [str(f) for f in check_triton_repo(repo_copy)]
    assert len(findings) == 1 and "(the data file is missing from the version folder)" in findings[0], findings


def test_check_triton_accepts_a_warmup_that_fits(repo_copy):
    config = repo_copy / "small" / "config.pbtxt"
    _warmup(config, batch=32)
    assert check_triton_repo(repo_copy) == []
    (repo_copy / "small" / "warmup").mkdir()
    (repo_copy / "small" / "warmup" / "images.bin").write_bytes(b"\0" * 4 * 192 * 192)
    _warmup(config, data='input_data_file: "images.bin"')
    assert check_triton_repo(repo_copy) == []


def test_export_into_a_model_folder_with_non_utf8_labels_is_refused(repo_copy, small_onnx):
    (repo_copy / "small" / "labels.txt").write_bytes(b"normal\npneumon\xe9a\ncovid19\n")
    with pytest.raises(ConfigError, match=r"another contract \(labels.txt differ"):
        write_triton_repo(repo_copy, "small", small_onnx, None, **OPTS)


def test_check_triton_names_the_file_and_line_of_a_syntax_error(repo_copy, tmp_path):
    config = repo_copy / "small" / "config.pbtxt"
    line = config.read_text().splitlines().index("max_batch_size: 32") + 1
    _replace(config, "max_batch_size: 32", "max_batch_size = 32 }")
    r = invoke("check-triton", repo_copy, "--json", tmp_path / "c.json")
    assert r.exit_code == 1 and f"{config}:{line}:" in r.output, r.output
    finding = json.loads((tmp_path / "c.json").read_text())["findings"][0]
    assert finding["path"] == str(config) and finding["line"] == line


def test_check_triton_refuses_an_unusable_folder(tmp_path):
    r = invoke("check-triton", tmp_path / "missing")
    assert r.exit_code == 2 and "does not exist" in r.output, r.output
    (tmp_path / "empty").mkdir()
    r = invoke("check-triton", tmp_path / "empty")
    assert r.exit_code == 1 and "holds no model folder" in r.output, r.output


def test_graph_whose_shapes_disagree_with_its_spec_is_refused(small_onnx, tmp_path):
    bad = edited_graph(small_onnx, tmp_path / "bad.onnx", **{"ctmask.n_rois": "32"})
    with pytest.raises(CtmaskError, match="disagree with its ctmask spec") as err:
        write_triton_repo(tmp_path / "repo", "bad", bad, None, **OPTS)
    assert "output rois declares [batch, 64, 5], the spec says [batch, 32, 5]" in str(err.value)
    r = invoke("export", bad, "--triton-repo", tmp_path / "repo")
    assert r.exit_code == 2 and "bad.onnx" in r.output, r.output
    assert not (tmp_path / "repo").exists()


def test_reexport_same_content_is_accepted_other_content_is_the_next_version_or_refused(repo_copy, small_onnx,
                                                                                       tmp_path):
    before = tree(repo_copy)
    again = write_triton_repo(repo_copy, "small", small_onnx, None, **OPTS)
    assert [(m["version"], m["status"]) for m in again["models"]] == [(1, "unchanged")]
    assert tree(repo_copy) == before
    # The same file with other serving options: the config is shared by all versions, so refused.
    with pytest.raises(ConfigError, match="holds this model already") as err:
        write_triton_repo(repo_copy, "small", small_onnx, None, **(OPTS | {"max_batch": 16}))
    assert str(repo_copy / "small" / "config.pbtxt") in str(err.value) and "max_batch_size" in str(err.value)
    assert tree(repo_copy) == before
    # Another graph of the same contract (here: other provenance metadata, so other bytes).
    other = edited_graph(small_onnx, tmp_path / "retrained.onnx", **{"ctmask.checkpoint": "retrained.pt"})
    with pytest.raises(ConfigError, match="version 1 exists and its model file differs") as err:
        write_triton_repo(repo_copy, "small", other, None, **(OPTS | {"version": 1}))
    assert str(repo_copy / "small" / "1") in str(err.value)
    assert tree(repo_copy) == before
    added = write_triton_repo(repo_copy, "small", other, None, **OPTS)
    assert [(m["version"], m["status"]) for m in added["models"]] == [(2, "written")]
    assert (repo_copy / "small" / "2" / "model.onnx").read_bytes() == other.read_bytes()
    assert (repo_copy / "small" / "1" / "model.onnx").read_bytes() == small_onnx.read_bytes()
    params = parse(repo_copy / "small" / "config.pbtxt").parameters
    assert params["ctmask.v1.sha256"].string_value == hashlib.sha256(small_onnx.read_bytes()).hexdigest()
    assert params["ctmask.v2.sha256"].string_value == hashlib.sha256(other.read_bytes()).hexdigest()
    assert check_triton_repo(repo_copy) == []
    # A graph of another contract (other class names) cannot share the model's config.
    after = tree(repo_copy)
    renamed = edited_graph(small_onnx, tmp_path / "renamed.onnx", **{"ctmask.class_names": '["a", "b", "c"]'})
    with pytest.raises(ConfigError, match="another contract"):
        write_triton_repo(repo_copy, "small", renamed, None, **OPTS)
    assert tree(repo_copy) == after
    assert not [p for p in repo_copy.rglob(".ctmask-tmp-*")]


def test_a_failed_copy_leaves_nothing_half_written(repo_copy, small_onnx, tmp_path, monkeypatch):
    import ctmask.scale.triton_write as triton

    def failing(src, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton.shutil, "copyfile", failing)
    with pytest.raises(OSError):
        write_triton_repo(tmp_path / "fresh", "small", small_onnx, None, **OPTS)
    assert list((tmp_path / "fresh").iterdir()) == []
    before = tree(repo_copy)
    other = edited_graph(small_onnx, tmp_path / "retrained.onnx", **{"ctmask.checkpoint": "retrained.pt"})
    with pytest.raises(OSError):
        write_triton_repo(repo_copy, "small", other, None, **OPTS)
    assert tree(repo_copy) == before and sorted(p.name for p in (repo_copy / "small").iterdir()) == [
        "1", "config.pbtxt", "labels.txt"]


@pytest.fixture()
def sidecar_engine(small_onnx, tmp_path):
    """An engine file as `export --engine tensorrt` writes it, with ctmask's own sidecar writer.
    The plan bytes are opaque, not a TensorRT plan (no TensorRT or GPU here): what is tested
    with it is the repository layout and the tensorrt_plan config, not an engine."""
    from ctmask.core.fileio import sha256_file
    from ctmask.trt.engine import BatchProfile, EngineInfo, plan_sha256, write_engine

    plan = bytes(range(256)) * 8
    meta = {p.key: p.value for p in onnx.load(str(small_onnx), load_external_data=False).metadata_props}
    info = EngineInfo(tensorrt_version="10.13.0.35", gpu_name="NVIDIA H200", compute_capability="9.0",
                      onnx_sha256=sha256_file(small_onnx), onnx_content_sha256="c" * 64, graph_metadata=meta,
                      profile=BatchProfile(1, 8, 16), plan_sha256=plan_sha256(plan), plan_bytes=len(plan),
                      onnx_file=str(small_onnx), plugins=("libnvinfer_plugin (ROIAlign_TRT)",))
    engine = tmp_path / "engines" / "small.engine"
    engine.parent.mkdir()
    write_engine(engine, plan, info)
    return engine, plan


def test_tensorrt_plan_layout_and_config_from_a_sidecar(sidecar_engine, small_onnx, tmp_path):
    """Repository layout / config test: the plan is opaque bytes (see the fixture)."""
    engine, plan = sidecar_engine
    repo = tmp_path / "repo"
    summary = write_triton_repo(repo, "small", small_onnx, engine, **OPTS)
    assert [(m["model"], m["platform"]) for m in summary["models"]] == [("small", "onnxruntime_onnx"),
                                                                         ("small_trt", "tensorrt_plan")]
    config_path = repo / "small_trt" / "config.pbtxt"
    config = parse(config_path)
    assert (config.platform, config.backend, config.max_batch_size) == ("tensorrt_plan", "tensorrt", 16)
    assert list(config.dynamic_batching.preferred_batch_size) == [8]  # the profile's OPT
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert (repo / "small_trt" / "1" / "model.plan").read_bytes() == plan
    assert [e.name for e in config.output] == ["rois", "logits", "probs", "boxes", "labels"]
    assert [list(e.dims) for e in config.input] == [[1, 192, 192]]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["ctmask.v1.profile"] == "1,8,16" and params["ctmask.v1.tensorrt_version"] == "10.13.0.35"
    assert "ROIAlign_TRT" in params["ctmask.v1.plugins"] and "ROIAlign_TRT" in config_path.read_text()
    assert check_triton_repo(repo) == []
    _warmup(config_path, batch=16)
    assert check_triton_repo(repo) == []  # a warmup that fits the plan's config
    _warmup(config_path, batch=32, dims=[1, 96, 96])
    assert sorted(str(f) for f in check_triton_repo(repo)) == [
        f"{config_path}: model_warmup 'w' input images: dims [1, 96, 96], the config takes [1, 192, 192] after the "
        "batch",
        f"{config_path}: model_warmup 'w': batch_size 32 is not within 1..max_batch_size (16); Triton refuses to load "
        "the model"]
    config_path.write_text(config_path.read_text().split("model_warmup {")[0])
    _replace(config_path, "max_batch_size: 16", "max_batch_size: 32")
    assert any("above version 1's batch profile MAX 16" in str(f) for f in check_triton_repo(repo))


def test_tensorrt_plan_options_beyond_the_engine_are_refused_before_writing(sidecar_engine, small_onnx, tmp_path):
    engine, _ = sidecar_engine
    repo = tmp_path / "repo"
    with pytest.raises(ConfigError, match="above the batch profile's MAX 16"):
        write_triton_repo(repo, "small", small_onnx, engine, **(OPTS | {"max_batch": 32}))
    r = invoke("export", engine, "--triton-repo", repo, "--triton-kind", "cpu")
    assert r.exit_code == 2 and "--triton-kind cpu" in r.output, r.output
    assert not repo.exists()  # the graph was not written either
    r = invoke("export", engine, "--triton-repo", repo)  # an existing engine packaged alone
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in repo.iterdir()) == ["small_trt"]
    assert invoke("check-triton", repo).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--triton-max-batch", "0"], "--triton-max-batch"),
    (["--triton-kind", "tpu"], "--triton-kind"),
    (["--triton-name", "a/b"], "--triton-name"),
    (["--triton-instances", "0"], "--triton-instances"),
    (["--out", "x.onnx"], "--out"),
    (["--precision", "fp16"], "--precision"),
])
def test_bad_triton_options_are_refused_before_anything_is_written(small_onnx, tmp_path, args, message):
    r = invoke("export", small_onnx, "--triton-repo", tmp_path / "repo", *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert list(tmp_path.iterdir()) == []
    r = invoke("export", small_onnx, "--triton-name", "x")  # a Triton option without --triton-repo
    assert r.exit_code == 2 and "--triton-repo" in r.output, r.output


def test_without_tritonclient_export_names_the_extra(small_onnx, tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "ctmask.scale.triton_schema")
    for name in [m for m in sys.modules if m == "tritonclient" or m.startswith("tritonclient.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None: `import` raises ModuleNotFoundError
    r = invoke("export", small_onnx, "--triton-repo", tmp_path / "repo")
    assert r.exit_code == 2 and "pip install 'ctmask[triton]'" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("args, message", [
    (["--triton-max-batch", "64"], "--triton-max-batch 64 is above the engine's --batch MAX 32"),
    (["--triton-kind", "cpu"], "--triton-kind cpu"),
    (["--batch", "2,8,32"], "needs MIN 1"),
])
def test_engine_build_for_triton_refuses_bad_options_before_tensorrt_is_needed(small_onnx, tmp_path, args, message):
    r = invoke("export", small_onnx, "--engine", "tensorrt", "--out", tmp_path / "m.engine", "--triton-repo",
               tmp_path / "repo", *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert list(tmp_path.iterdir()) == []
