"""TensorRT engines: everything that needs no libnvinfer runs here (version plan, batch
profile, the sidecar and the refusal of a mismatched or edited engine, the messages when
TensorRT or a GPU is missing: exit 2, nothing written); the engine build and the runner
itself are marked ``tensorrt`` and skip here with the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests_helpers import invoke

from ctmask.core.errors import EngineError, TensorRTUnavailable
from ctmask.core.spec import FORMAT
from ctmask.trt.api import ApiPlan, TrtVersion, require_tensorrt
from ctmask.trt.engine import (
    BatchProfile,
    EngineInfo,
    check_compatible,
    check_plan,
    plan_sha256,
    read_sidecar,
    sidecar_path,
    write_engine,
)


def trt_missing_reason() -> str | None:
    try:
        require_tensorrt()
    except TensorRTUnavailable as exc:
        return exc.message
    return None


# ---------------------------------------------------------------- versions and API plan


@pytest.mark.parametrize("text, major, strongly_typed_flag", [
    ("10.13.0.35", 10, True),
    ("10.0.1", 10, True),
    ("11.4.1", 11, False),
])
def test_api_plan_branches_on_the_major(text, major, strongly_typed_flag):
    plan = ApiPlan.for_version(TrtVersion.parse(text))
    assert (plan.major, plan.strongly_typed_flag) == (major, strongly_typed_flag)
    if not strongly_typed_flag:
        assert plan.network_flags() == 0  # 11.x: strong typing is the only mode, no flag (and no tensorrt import)


@pytest.mark.parametrize("text, why", [("8.6.1", "TensorRT 8.6.1 is installed"), ("12.0", "TensorRT 12.0"),
                                       ("nightly", "cannot read the TensorRT version")])
def test_unsupported_tensorrt_versions_are_refused(text, why):
    with pytest.raises(TensorRTUnavailable, match=why):
        TrtVersion.parse(text)


def test_missing_tensorrt_says_what_and_how():
    reason = trt_missing_reason()
    if reason is None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(TensorRTUnavailable) as err:
        require_tensorrt()
    # tensorrt-stubs (installed for mypy) makes `import tensorrt` succeed as an empty namespace
    # package: that must still read as "not installed", not crash later on a missing attribute.
    assert "TensorRT" in err.value.message
    assert "pip install 'ctmask[trt]'" in str(err.value)


# ---------------------------------------------------------------- batch profile


def test_batch_profile_parse_and_shapes():
    from ctmask.core.presets import SMALL
    from ctmask.core.spec import GraphSpec

    p = BatchProfile.parse("1,8,32")
    assert (p.min, p.opt, p.max) == (1, 8, 32)
    assert BatchProfile.parse("8") == BatchProfile(1, 8, 8)
    spec = GraphSpec.for_preset(SMALL)
    assert p.shapes(spec) == {"min": (1, 1, SMALL.image_size, SMALL.image_size),
                              "opt": (8, 1, SMALL.image_size, SMALL.image_size),
                              "max": (32, 1, SMALL.image_size, SMALL.image_size)}


@pytest.mark.parametrize("text", ["0,8,32", "8,4,32", "1,8", "a,b,c", "1,8,100000", ""])
def test_bad_batch_profiles_are_refused(text):
    from ctmask.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--batch"):
        BatchProfile.parse(text)


def test_batches_are_split_within_the_profile_and_padded_to_its_minimum():
    assert BatchProfile(1, 8, 32).chunks(70) == [(0, 32, 32), (32, 64, 32), (64, 70, 6)]
    assert BatchProfile(4, 8, 8).chunks(3) == [(0, 3, 4)]  # padded to the minimum
    assert BatchProfile(4, 8, 8).chunks(10) == [(0, 8, 8), (8, 10, 4)]
    assert BatchProfile(1, 1, 1).chunks(0) == []
    for n in range(1, 40):  # every slice exactly once, in order
        rows = [i for a, b, _ in BatchProfile(2, 4, 7).chunks(n) for i in range(a, b)]
        assert rows == list(range(n))


# ---------------------------------------------------------------- the sidecar


def graph_metadata(path):
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture()
def engine_pair(small_onnx, tmp_path):
    """An engine file and its sidecar as ``export --engine`` writes them. The plan bytes
    are not a real TensorRT plan (no TensorRT here): these tests exercise ctmask's own file
    contract, which every check below runs before TensorRT is touched."""
    from ctmask.core.fileio import sha256_file

    plan = bytes(range(256)) * 16
    info = EngineInfo(tensorrt_version="10.13.0.35", gpu_name="NVIDIA H200", compute_capability="9.0",
                      onnx_sha256=sha256_file(small_onnx), onnx_content_sha256="c" * 64,
                      graph_metadata=graph_metadata(small_onnx), profile=BatchProfile(1, 8, 32),
                      plan_sha256=plan_sha256(plan), plan_bytes=len(plan), workspace_gb=4.0,
                      onnx_file=str(small_onnx))
    engine = tmp_path / "model.engine"
    write_engine(engine, plan, info)
    return engine, info


def test_sidecar_round_trip_holds_what_the_issue_lists(engine_pair, small_onnx):
    engine, info = engine_pair
    side = json.loads(sidecar_path(engine).read_text())
    assert side["format"] == "ctmask-trt-engine/1"
    assert side["tensorrt_version"] == "10.13.0.35"
    assert side["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert side["onnx"]["sha256"] == info.onnx_sha256 and side["onnx"]["file"] == str(small_onnx)
    assert (side["precision"], side["n_rois"], side["input_size"]) == ("fp32", 64, 192)
    assert side["ctmask_version"] and side["plan"]["bytes"] == engine.stat().st_size
    back = read_sidecar(engine)
    assert back == info
    assert back.spec.n_rois == 64 and back.spec.precision == "fp32"


def test_engine_of_another_tensorrt_or_gpu_is_refused_naming_it_and_how_to_rebuild(engine_pair):
    engine, info = engine_pair
    check_compatible(info, engine, "10.13.0.35", "NVIDIA H200", "9.0")  # the build machine: fine
    check_compatible(info, engine, "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")  # same capability: runs
    with pytest.raises(EngineError) as err:
        check_compatible(info, engine, "10.8.0.43", "NVIDIA H200", "9.0")
    assert "TensorRT 10.13.0.35 built it, this machine has TensorRT 10.8.0.43" in str(err.value)
    assert "ctmask export" in str(err.value) and "--engine tensorrt" in str(err.value)
    with pytest.raises(EngineError) as err:
        check_compatible(info, engine, "10.13.0.35", "NVIDIA A100-SXM4-80GB", "8.0")
    assert "compute capability 9.0" in str(err.value) and "A100" in str(err.value)


def test_edited_or_swapped_plan_is_refused(engine_pair):
    engine, info = engine_pair
    plan = engine.read_bytes()
    check_plan(info, plan, engine)
    with pytest.raises(EngineError, match="changed after the build"):
        check_plan(info, plan[:-1] + b"\x00", engine)
    with pytest.raises(EngineError, match="changed after the build"):
        check_plan(info, plan[:100], engine)


def test_sidecar_problems_are_named(engine_pair, tmp_path):
    engine, info = engine_pair
    side = sidecar_path(engine)
    data = json.loads(side.read_text())
    bad = dict(data, graph_metadata=dict(data["graph_metadata"], **{"ctmask.format": "ctmask-onnx/0"}))
    side.write_text(json.dumps(bad))
    with pytest.raises(EngineError, match=f"this ctmask reads '{FORMAT}'"):
        read_sidecar(engine)
    side.write_text(json.dumps(dict(data, format="something/9")))
    with pytest.raises(EngineError, match="not a ctmask engine sidecar"):
        read_sidecar(engine)
    side.write_text("{ not json")
    with pytest.raises(EngineError, match="unreadable engine sidecar"):
        read_sidecar(engine)
    side.write_text(json.dumps({k: v for k, v in data.items() if k != "profile"}))
    with pytest.raises(EngineError, match="malformed engine sidecar"):
        read_sidecar(engine)
    for bad, why in ((dict(data, profile={"min": 1, "opt": 8, "max": 10**9}), "profile"),
                     (dict(data, tensorrt_version=None), "tensorrt_version"),
                     (dict(data, plan={"sha256": "x", "bytes": 4096}), "sha256"),
                     (dict(data, graph_metadata=dict(data["graph_metadata"], **{"ctmask.precision": "int4"})),
                      "int4"),
                     (dict(data, graph_metadata=dict(data["graph_metadata"], **{"ctmask.input_size": "-5"})),
                      "input size -5")):
        side.write_text(json.dumps(bad))
        with pytest.raises(EngineError, match=why) as err:
            read_sidecar(engine)
        assert "--engine tensorrt" in str(err.value)  # says how to rebuild
    side.unlink()
    with pytest.raises(EngineError, match="no sidecar"):
        read_sidecar(engine)
    with pytest.raises(EngineError, match="does not exist"):
        read_sidecar(tmp_path / "nothing.engine")


def test_nested_or_out_of_range_sidecar_is_an_engine_error(engine_pair):
    """A sidecar nested 200,000 deep (whole file, or the class names inside it) is no RecursionError;
    graph metadata out of range is refused naming the field."""
    engine, _ = engine_pair
    side = sidecar_path(engine)
    data = json.loads(side.read_text())
    side.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(EngineError, match="nested too deeply") as err:
        read_sidecar(engine)
    assert str(side) in str(err.value)
    for key, value, words in (("ctmask.class_names", "[" * 200_000 + "]" * 200_000, "nested too deeply"),
                              ("ctmask.window", '{"level": -600, "width": 0}', "ctmask.window: width 0.0")):
        side.write_text(json.dumps(dict(data, graph_metadata=dict(data["graph_metadata"], **{key: value}))))
        with pytest.raises(EngineError, match=words) as err:
            read_sidecar(engine)
        assert key in str(err.value) and "--engine tensorrt" in str(err.value)


def test_failed_plan_write_leaves_no_sidecar(tmp_path, small_onnx, monkeypatch):
    import ctmask.core.fileio as fileio

    plan = b"plan"
    info = EngineInfo("10.13.0.35", "GPU", "9.0", "a" * 64, "", graph_metadata(small_onnx), BatchProfile(1, 1, 1),
                      plan_sha256(plan), len(plan))
    real = fileio.write_bytes_atomic

    def failing(path, data):
        if str(path).endswith(".engine"):
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(fileio, "write_bytes_atomic", failing)
    with pytest.raises(OSError):
        write_engine(tmp_path / "m.engine", plan, info)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the commands without TensorRT


def test_export_engine_without_tensorrt_exits_2_and_writes_nothing(small_onnx, cls_ckpt, synth_dir, tmp_path):
    reason = trt_missing_reason()
    if reason is None:
        pytest.skip("TensorRT is installed here")
    out = tmp_path / "out" / "m.engine"
    r = invoke("export", small_onnx, "--engine", "tensorrt", "--out", out)
    assert r.exit_code == 2, r.output
    assert "TensorRT" in r.output and "pip install 'ctmask[trt]'" in r.output and "Traceback" not in r.output
    r = invoke("export", cls_ckpt, "--engine", "tensorrt", "--precision", "fp16", "--out", out,
               "--images", synth_dir / "test")
    assert r.exit_code == 2, r.output
    assert "pip install 'ctmask[trt]'" in r.output
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--out", "m.onnx"], "must name an engine file"),
    (["--out", "m.engine", "--engine", "onnxruntime"], "unknown --engine"),
    (["--out", "m.engine", "--batch", "4,2,8"], "--batch"),
    (["--out", "m.engine", "--workspace", "0"], "--workspace"),
    (["--out", "m.engine", "--workspace", "nan"], "--workspace"),
    (["--out", "m.engine", "--timing-cache", "."], "--timing-cache"),
])
def test_export_engine_option_errors(small_onnx, tmp_path, args, message):
    args = [tmp_path / a if a in ("m.onnx", "m.engine") else tmp_path if a == "." else a for a in args]
    if "--engine" not in args:
        args += ["--engine", "tensorrt"]
    r = invoke("export", small_onnx, *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_engine_from_a_checkpoint_needs_parity_slices(cls_ckpt, tmp_path):
    r = invoke("export", cls_ckpt, "--engine", "tensorrt", "--out", tmp_path / "m.engine")
    assert r.exit_code == 2 and "--images" in r.output, r.output
    r = invoke("export", cls_ckpt, "--out", tmp_path / "m.onnx", "--batch", "1,4,8")
    assert r.exit_code == 2 and "only apply to --engine tensorrt" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_infer_and_bench_on_an_engine_without_tensorrt(engine_pair, synth_dir, tmp_path):
    reason = trt_missing_reason()
    if reason is None:
        pytest.skip("TensorRT is installed here")
    engine, _ = engine_pair
    out = tmp_path / "preds.jsonl"
    r = invoke("infer", engine, synth_dir / "test", "--out", out)
    assert r.exit_code == 2, r.output
    assert "pip install 'ctmask[trt]'" in r.output and "Traceback" not in r.output
    assert not out.exists()
    r = invoke("bench", engine, "--backend", "tensorrt-cuda", "--iterations", 1, "--warmup", 0)
    assert r.exit_code == 2 and "cannot run tensorrt-cuda" in r.output, r.output
    assert "pip install 'ctmask[trt]'" in r.output
    r = invoke("infer", engine, synth_dir / "test", "--backend", "onnxruntime")
    assert r.exit_code == 2 and "engine runs on TensorRT only" in r.output, r.output


def test_infer_refuses_an_engine_without_its_sidecar_before_tensorrt(engine_pair, synth_dir):
    engine, _ = engine_pair
    sidecar_path(engine).unlink()
    r = invoke("infer", engine, synth_dir / "test")
    assert r.exit_code == 2 and "no sidecar" in r.output and "--engine tensorrt" in r.output, r.output


# ---------------------------------------------------------------- on a GPU with TensorRT


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_builds_and_keeps_parity(cls_ckpt, small_onnx, synth_dir, tmp_path):
    """Build an FP32 engine of the small graph, run it through the runner, and judge it with
    the parity gate against PyTorch; the engine's outputs must also match onnxruntime's."""
    from ctmask.backends.parity import check_parity
    from ctmask.runtime.runner import OnnxRuntimeRunner
    from ctmask.runtime.tensorrt_runner import TensorRTRunner
    from ctmask.trt.build import BuildOptions, build_engine

    engine = tmp_path / "small.engine"
    info = build_engine(small_onnx, engine, BuildOptions(BatchProfile(1, 4, 8), 1.0, tmp_path / "timing.cache"))
    assert (tmp_path / "timing.cache").is_file() and read_sidecar(engine) == info
    images = np.random.default_rng(0).uniform(0, 1, (11, 1, 192, 192)).astype(np.float32)  # 8 + 3: two chunks
    with TensorRTRunner(engine) as trt_run, OnnxRuntimeRunner(small_onnx) as ort:
        got, want = trt_run.infer({"images": images}), ort.infer({"images": images})
    np.testing.assert_allclose(got["probs"], want["probs"], atol=1e-3)
    report = check_parity(cls_ckpt, engine, [synth_dir / "test"], 16)
    assert report["passed"], report["failures"]


@pytest.mark.slow
def test_mypy_with_the_stubs_catches_a_misspelt_tensorrt_call(tmp_path):
    """`make test` type-checks ctmask's TensorRT code against tensorrt-stubs; this proves the
    check can fail: a misspelt call in code shaped like ctmask's is an error."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stubs = tmp_path / "stubs"
    made = subprocess.run([sys.executable, root / "scripts" / "trt_stubs.py", stubs], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"tensorrt-stubs not usable here: {made.stderr.strip()}")
    bad = tmp_path / "bad.py"
    bad.write_text("import tensorrt as trt\n\n\ndef build(logger: trt.ILogger) -> None:\n"
                   "    builder = trt.Builder(logger)\n    builder.create_netwrk(0)\n"
                   "    trt.Runtime(logger).deserialize_cuda_engine(b'').create_execution_context()"
                   ".execute_async_v4(0)\n")
    cfg = tmp_path / "mypy.ini"
    cfg.write_text(f"[mypy]\npython_version = 3.10\nmypy_path = {stubs}\n"
                   "[mypy-tensorrt.*,tensorrt_bindings.*,tensorrt_libs.*]\nignore_errors = True\n"
                   "ignore_missing_imports = True\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", cfg, "--cache-dir", tmp_path / "cache", bad],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'has no attribute "create_netwrk"' in r.stdout and 'has no attribute "execute_async_v4"' in r.stdout
