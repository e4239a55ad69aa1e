"""The OpenVINO backend: parity with onnxruntime, dynamic batch, model errors, CLI wiring."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests_helpers import assert_rois_match, invoke

from ctmask.core.errors import ConfigError, ModelError
from ctmask.runtime.openvino_runner import OpenVinoRunner


@pytest.fixture()
def test_slices(synth_dir, tmp_path):
    """A folder with four good test slices."""
    folder = tmp_path / "slices"
    folder.mkdir()
    for f in sorted((synth_dir / "images").glob("test_*.png"))[:4]:
        shutil.copy(f, folder / f.name)
    return folder


def test_f32_matches_onnxruntime_at_batch_1_and_3(small_onnx, synth_dir):
    pytest.importorskip("openvino")
    from ctmask.runtime.runner import OnnxRuntimeRunner
    from ctmask.scans.batch import load_batch

    files = sorted((synth_dir / "images").glob("test_*.png"))[:3]
    with OnnxRuntimeRunner(small_onnx) as ort_runner:
        loaded = load_batch(files, ort_runner.spec)
        batch, ok, failures = loaded.batch, loaded.paths, loaded.failures
        assert ok == files and not failures
        ref = ort_runner.infer({"images": batch})
    with OpenVinoRunner(small_onnx, threads=2) as ov_runner:
        assert ov_runner.spec == ort_runner.spec  # read from the same metadata_props
        got3 = ov_runner.infer({"images": batch})
        got1 = [ov_runner.infer({"images": batch[i:i + 1]}) for i in range(3)]
        again3 = ov_runner.infer({"images": batch})  # back to 3 on the same compiled model
        info = ov_runner.describe()
    for got in (got3, {k: np.concatenate([g[k] for g in got1]) for k in got3}, again3):
        assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (np.float32, v.shape) for k, v in ref.items()}
        assert_rois_match(got["rois"], ref["rois"], score_atol=1e-4)
        np.testing.assert_allclose(got["logits"], ref["logits"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(got["probs"], ref["probs"], rtol=0, atol=1e-4)
        assert (got["logits"].argmax(1) == ref["logits"].argmax(1)).all()
    assert info["backend"] == "openvino-cpu" and info["precision_hint"] == "f32" and info["threads"] == 2
    assert info["inference_precision"] == "f32" and info["device"] == "CPU"
    assert "FP32" in info.get("optimization_capabilities", ["FP32"])
    assert set(info.get("execution_precision", {}).values()) <= {"f32"}
    json.dumps(info)  # infer --json and bench embed it


def test_model_errors_name_the_file(small_onnx, foreign_model, tmp_path):
    pytest.importorskip("openvino")
    import onnx

    from ctmask.core.presets import SMALL
    from ctmask.core.spec import GraphSpec

    missing = tmp_path / "missing.onnx"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf\x00\x01")
    # A valid ONNX graph carrying ctmask metadata but not the ctmask inputs/outputs.
    wrong = tmp_path / "wrong.onnx"
    proto = onnx.load(str(foreign_model))
    onnx.helper.set_model_props(proto, GraphSpec.for_preset(SMALL).metadata())
    onnx.save(proto, str(wrong))
    cases = {missing: "does not exist", junk: "not a loadable ONNX model", foreign_model: "no ctmask metadata",
             wrong: "graph inputs/outputs are"}
    for path, words in cases.items():
        with pytest.raises(ModelError, match=words) as err:
            OpenVinoRunner(path).activate()
        assert str(err.value).startswith(str(path)), err.value
    with pytest.raises(ConfigError, match="precision hint"):
        OpenVinoRunner(small_onnx, hint="fp8")


def test_missing_openvino_is_a_config_error_with_the_install_command(small_onnx, monkeypatch):
    from ctmask.backends.registry import onnxruntime_resolver, openvino_resolver, plan_backends

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(ConfigError) as err:
        OpenVinoRunner(small_onnx).activate()
    assert "pip install 'ctmask[openvino]'" in str(err.value)
    resolvers = {"onnxruntime": onnxruntime_resolver(small_onnx, 1), "openvino": openvino_resolver(small_onnx, 1)}
    plan = plan_backends(small_onnx, None, resolvers)
    assert "onnxruntime-cpu" in plan.factories and "openvino-cpu" not in plan.factories
    assert "pip install 'ctmask[openvino]'" in plan.skipped["openvino-cpu"]
    res = invoke("bench", small_onnx, "--backend", "openvino-cpu", "-b", "1", "-q")
    assert res.exit_code == 2 and "openvino-cpu" in res.output and "ctmask[openvino]" in res.output
    assert "Traceback" not in res.output


def test_bench_plans_openvino_by_default_and_bf16_only_when_named(small_onnx):
    pytest.importorskip("openvino")
    from ctmask.backends.registry import onnxruntime_resolver, openvino_resolver, plan_backends

    resolvers = {"onnxruntime": onnxruntime_resolver(small_onnx, 1), "openvino": openvino_resolver(small_onnx, 1)}
    plan = plan_backends(small_onnx, None, resolvers)
    assert {"onnxruntime-cpu", "openvino-cpu"} <= set(plan.factories) and "openvino-bf16" not in plan.factories
    plan = plan_backends(small_onnx, ["openvino-bf16"], resolvers)
    runner = plan.factories["openvino-bf16"]()
    assert isinstance(runner, OpenVinoRunner) and runner.hint == "bf16" and runner.threads == 1


def test_infer_cli_with_the_openvino_backend(small_onnx, test_slices, tmp_path):
    pytest.importorskip("openvino")
    outs = {}
    for backend in ("onnxruntime", "openvino"):
        out = tmp_path / f"{backend}.jsonl"
        res = invoke("infer", small_onnx, test_slices, "--backend", backend, "--out", out, "-b", "3", "-q",
                     "--json", tmp_path / f"{backend}.json")
        assert res.exit_code == 0, res.output
        outs[backend] = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "openvino.json").read_text())
    assert summary["predicted"] == 4 and summary["runner"]["backend"] == "openvino-cpu"
    for a, b in zip(outs["openvino"], outs["onnxruntime"], strict=True):
        assert a["file"] == b["file"] and a["class"] == b["class"]
        for c, p in b["probs"].items():
            assert abs(a["probs"][c] - p) <= 1e-4 + 1e-6, (a, b)
    res = invoke("infer", small_onnx, test_slices, "--backend", "openvino", "--device", "cuda", "-q")
    assert res.exit_code == 2 and "CPU only" in res.output


def test_bench_measures_onnxruntime_and_openvino_in_one_run(small_onnx, tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "bench.json"
    res = invoke("bench", small_onnx, "--backend", "onnxruntime-cpu", "--backend", "openvino-cpu", "--backend",
                 "openvino-bf16", "-b", "1", "-b", "2", "--warmup", "1", "--iterations", "1", "--threads", "2",
                 "--json", out, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    got = {(r["backend"], r["batch_size"]): r for r in report["results"]}
    assert set(got) == {(b, n) for b in ("onnxruntime-cpu", "openvino-cpu", "openvino-bf16") for n in (1, 2)}
    for (name, _), r in got.items():
        assert r["latency_ms"]["p50"] > 0 and r["throughput"] > 0
        if name.startswith("openvino"):
            assert r["precision_hint"] == ("bf16" if name.endswith("bf16") else "f32") and r["threads"] == 2
    assert "openvino-cpu" in res.output and "openvino-bf16" in res.output


def test_the_openvino_runner_never_imports_torch(small_onnx):
    """A subprocess in which importing torch raises: the runner must still load and run."""
    pytest.importorskip("openvino")
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import numpy as np\n"
        "from ctmask.runtime.openvino_runner import OpenVinoRunner\n"
        f"with OpenVinoRunner({str(small_onnx)!r}, threads=1) as r:\n"
        "    s = r.spec.image_size\n"
        "    out = r.infer({'images': np.zeros((2, 1, s, s), np.float32)})\n"
        "print('shapes', out['rois'].shape[0], out['logits'].shape)\n"
        "print('torch loaded:', any(m == 'torch' or m.startswith('torch.') for m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "shapes 2 (2, 3)" in proc.stdout, proc.stdout + proc.stderr
    assert "torch loaded: False" in proc.stdout
