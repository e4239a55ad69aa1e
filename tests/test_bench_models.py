"""ctmask bench with several graphs of one model (FP32 / FP16 / INT8) in the same run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from tests_helpers import invoke

from ctmask.backends.registry import plan_models
from ctmask.cli.deploy import format_bench
from ctmask.core.presets import SMALL
from ctmask.core.spec import GraphSpec
from ctmask.runtime.bench import BenchPlan, MultiPlan, run_plan
from ctmask.runtime.runner import Runner

FAST = ("-b", "1", "--warmup", "0", "--iterations", "1", "-q")



def with_metadata(src: Path, dst: Path, **meta: str) -> Path:
    """Copy of the graph ``src`` with metadata keys ``ctmask.<key>`` set (the graph is unchanged)."""
    model = onnx.load(str(src))
    props = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        key = f"ctmask.{key}"
        if key in props:
            props[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    return dst


def tiny_graph(path: Path, spec: GraphSpec) -> Path:
    """A one-node graph carrying ``spec``'s metadata: enough to plan, never to run."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for key, value in spec.metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- planning (no backend runs)


def test_plan_runs_the_torch_reference_once_and_checks_presets(tmp_path):
    fp32 = tiny_graph(tmp_path / "fp32.onnx", GraphSpec.for_preset(SMALL))
    int8 = tiny_graph(tmp_path / "int8.onnx", GraphSpec.for_preset(SMALL, precision="int8", int8_target="cpu"))
    asked = []

    def resolvers(model):
        def resolve(device, spec):
            asked.append((model.name, device))
            return (lambda: None), ""

        return {"onnxruntime": resolve, "torch": resolve}

    plan = plan_models([fp32, int8], ["onnxruntime-cpu", "torch-cpu"], resolvers)
    assert [list(p.factories) for p in plan.plans] == [["onnxruntime-cpu", "torch-cpu"], ["onnxruntime-cpu"]]
    assert plan.backends == ["onnxruntime-cpu", "torch-cpu"] and plan.plans[1].spec.int8_target == "cpu"
    assert ("int8.onnx", "cpu") in asked and asked.count(("fp32.onnx", "cpu")) == 2  # ort + torch

    paper = tiny_graph(tmp_path / "paper.onnx", GraphSpec(preset="paper", image_size=512, n_rois=256))
    res = invoke("bench", fp32, paper, "--backend", "onnxruntime-cpu", *FAST)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "share the input size" in res.output and "paper (512 x 512)" in res.output
    res = invoke("bench", fp32, tmp_path / "." / "fp32.onnx", "--backend", "onnxruntime-cpu", *FAST)
    assert res.exit_code == 2 and "given twice" in res.output


# ---------------------------------------------------------------- running (fake runners)


class FakeRunner(Runner):
    def __init__(self, spec: GraphSpec, name: str, fail: Exception | None = None):
        super().__init__()
        self.fake_spec, self.name, self.fail = spec, name, fail

    def activate_impl(self) -> GraphSpec:
        if self.fail:
            raise self.fail
        return self.fake_spec

    def infer_impl(self, feed):
        time.sleep(0.002)  # a measurable latency (p50 is rounded to the microsecond)
        return {}

    def deactivate_impl(self) -> None:
        pass


def test_a_refused_model_is_reported_and_the_others_run():
    spec32 = GraphSpec.for_preset(SMALL)
    spec8 = GraphSpec.for_preset(SMALL, precision="int8", int8_target="cpu")
    boom = RuntimeError("cannot compile QuantizeLinear\nsecond line")

    def plan(path, spec, fail_on=()):
        return BenchPlan(Path(path), spec, {b: (lambda s=spec, b=b: FakeRunner(s, b, boom if b in fail_on else None))
                                            for b in ("onnxruntime-cpu", "openvino-cpu")})

    multi = MultiPlan([plan("m/fp32.onnx", spec32), plan("m/int8.onnx", spec8, fail_on=("openvino-cpu",))])
    report = run_plan(multi, [1, 2], None, 0, 1, show_progress=False)
    got = [(r["backend"], Path(r["model"]).name, r["precision"], r["int8_target"], r["batch_size"])
           for r in report["results"]]
    ort, ov = "onnxruntime-cpu", "openvino-cpu"
    assert got == [(ort, "fp32.onnx", "fp32", None, 1), (ort, "fp32.onnx", "fp32", None, 2),
                   (ort, "int8.onnx", "int8", "cpu", 1), (ort, "int8.onnx", "int8", "cpu", 2),
                   (ov, "fp32.onnx", "fp32", None, 1), (ov, "fp32.onnx", "fp32", None, 2)]
    assert report["not_benchmarked"] == [{"backend": "openvino-cpu", "model": str(Path("m/int8.onnx")),
                                          "batch_size": 1, "reason": "RuntimeError: cannot compile QuantizeLinear"}]
    thr = {(r["backend"], r["model"], r["batch_size"]): r["throughput"] for r in report["results"]}
    fp32, int8 = str(Path("m/fp32.onnx")), str(Path("m/int8.onnx"))
    vs = report["speedup_vs_fp32"]
    assert report["fp32_baseline"] == fp32 and vs["openvino-cpu"] == {fp32: {1: 1.0, 2: 1.0}}
    assert vs["onnxruntime-cpu"][int8][2] == round(thr["onnxruntime-cpu", int8, 2] / thr["onnxruntime-cpu", fp32, 2], 3)
    table = format_bench(json.loads(json.dumps(report)))  # as read back from --json
    assert "int8 (cpu)" in table and "vs fp32" in table and "1.00x" in table

    # Without an FP32 graph there is no `vs fp32` ratio.
    report = run_plan(MultiPlan([plan("m/int8.onnx", spec8)]), [1], None, 0, 1, show_progress=False)
    assert report["speedup_vs_fp32"] == {} and report["fp32_baseline"] is None
    assert all(line.rstrip().endswith("-") for line in format_bench(report).splitlines()[1:])


# ---------------------------------------------------------------- end to end on the small graph


def test_bench_two_precisions_in_one_run(cls_ckpt, small_onnx, tmp_path):
    fp16 = with_metadata(small_onnx, tmp_path / "fp16.onnx", precision="fp16")
    out = tmp_path / "bench.json"
    res = invoke("bench", small_onnx, fp16, "--backend", "onnxruntime-cpu", "--backend", "torch-cpu",
                 "--checkpoint", cls_ckpt, "--json", out, *FAST)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    rows = {(r["backend"], Path(r["model"]).name): r for r in report["results"]}
    assert set(rows) == {("onnxruntime-cpu", small_onnx.name), ("onnxruntime-cpu", "fp16.onnx"),
                         ("torch-cpu", cls_ckpt.name)}  # the reference runs once
    assert rows["onnxruntime-cpu", "fp16.onnx"]["precision"] == "fp16"
    assert rows["onnxruntime-cpu", small_onnx.name]["precision"] == "fp32"
    assert [m["label"] for m in report["models"]] == ["fp32", "fp16"]
    vs = report["speedup_vs_fp32"]["onnxruntime-cpu"]
    assert vs[str(small_onnx)]["1"] == 1.0 and vs[str(fp16)]["1"] > 0
    assert set(report["speedup_vs_torch"]["onnxruntime-cpu"]) == {str(small_onnx), str(fp16)}
    assert set(report["speedup"]["onnxruntime-cpu"]) == {"1"}  # the first model's, as before
    line = next(t for t in res.output.splitlines() if "fp16.onnx" in t)
    assert line.startswith("onnxruntime-cpu") and " fp16 " in line and np.isfinite(float(line.split()[-1][:-1]))
    assert "vs fp32" in res.output and "vs torch" in res.output


def test_bench_reports_a_graph_the_backend_refuses_and_runs_the_rest(small_onnx, tmp_path):
    broken = onnx.load(str(small_onnx))
    broken.graph.node[0].op_type = "CtmaskNoSuchOp"
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    out = tmp_path / "bench.json"
    res = invoke("bench", small_onnx, tmp_path / "broken.onnx", "--backend", "onnxruntime-cpu", "--json", out, *FAST)
    assert res.exit_code == 0, res.output
    assert "not benchmarked: onnxruntime-cpu broken.onnx: not a loadable ONNX model" in res.output
    assert "Traceback" not in res.output
    report = json.loads(out.read_text())
    assert [Path(r["model"]).name for r in report["results"]] == [small_onnx.name]
    res = invoke("bench", tmp_path / "broken.onnx", "--backend", "onnxruntime-cpu", *FAST)
    assert res.exit_code == 2 and "nothing could be benchmarked" in res.output and "Traceback" not in res.output
