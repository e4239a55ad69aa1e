"""The PyTorch reference of an INT8 graph: its checkpoint, fake-quantized at the graph's own scales.

An INT8 detector's ranked rows are not a function of the FP32 model's: every requantization
rounds, and near-tied candidates swap or cross the N cut wherever a rounding flips. Judged
row by row against PyTorch FP32, every INT8 graph fails, right or wrong. The model an INT8
graph should equal is the checkpoint with the graph's quantization applied, which is what a
QAT fine-tune trains (:mod:`ctmask.training.qat`): ModelOpt fake-quantization, int8
per-channel weights from each channel's max |w|, and per-tensor activations at the graph's
scales (read from its QuantizeLinear nodes, mapped to modules as the QAT mapping does).

Parity then judges an INT8 graph three ways (docs/parity.md):

* ``int8.tensors``: the graph's quantized activations of the dense blocks (backbone, FPN,
  RPN head) against the fake-quantized model's, in int8 steps, on a few slices. Two faithful
  implementations differ only where accumulation order flips a rounding (about 0.5% of the
  values by more than one step, measured); a wrong scale, a missing or extra rounding, or
  other weights move far more values by many steps (:data:`TENSOR_LIMITS`);
* the row lines (``rois.score``, ``rois.deltas``, ``rois.order``, ``boxes``, ``labels``,
  ``rois.rows``, ``logits``, ``probs``) against the fake-quantized model, in aggregate: the
  graph's mean error on each (bad rows for ``rois.rows``) may be at most :data:`ROW_FACTOR`
  times the model's own movement under seeded input noise of a quarter gray level (below the
  8-bit slice's own quantization);
* ``class`` against PyTorch FP32 at the precision's absolute agreement (99%), every slice.

A graph whose quantization ModelOpt cannot express (asymmetric uint8 activations of a
calibrated cpu form, a shared module with several scales ...) has no such reference:
:func:`~ctmask.exporter.int8_graph.read_quantization` says why, and parity judges it against
FP32 as before.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from ctmask.core.noise import add_gray_noise
from ctmask.core.spec import Tolerance
from ctmask.exporter.int8_graph import GraphQuantization
from ctmask.exporter.reference import TorchRunner

DENSE_MODULES = ("backbone.", "rpn.head.")
"""Quantizers whose tensors ``int8.tensors`` compares: the dense blocks, computed at the same
positions by both sides (the box head runs on proposals, which rounding may change)."""

TENSOR_LIMITS = {"beyond_one_step": 0.02, "max_steps": 12.0}
"""``int8.tensors`` fails when more than this fraction of the compared values differ by more
than one int8 step, or any value by more than ``max_steps`` steps. Measured (4 slices): the
QAT detector of the small preset, its graphs of 3 heads and both targets, 0.27-0.28% and 6
steps; the untrained tiny test model 0.87% and 5 steps. Wrong graphs: the QAT graphs before
their residual and top-down paths were read in float (an extra rounding the model does not
have) 2.25% and 22 steps; a DequantizeLinear scale 1.25x its QuantizeLinear's 21% and 45
steps. Rounding flips spread through depth, so a deeper or less trained model may need more.
The reference takes its scales from the graph, so other (consistent) scales are not an
error here: the class line judges them."""

WEIGHT_LIMIT_STEPS = 0.51
"""``int8.weights``: a dequantized weight may be at most this many of its channel's steps from the
checkpoint's (BatchNorm-folded) weight: half a step of rounding, plus float slack of the folding."""

MIN_SLICES = 8
"""Fewer slices than this give no usable estimate of the model's own movement (measured: a
correct graph failed ``boxes`` on 1 and 2 slices): the row lines then fail, saying so."""

ROW_FACTOR = 1.5
"""A row line passes when the graph's mean absolute error on it (``rois.rows``: its bad rows)
is at most ``ROW_FACTOR`` times the fake-quantized model's own under the noise, plus
:data:`ROW_FLOOR` of the line's atol (``rois.rows``: :data:`ROW_SLACK_ROWS` rows). Means, not
counts of values past a tolerance: on 200 slices, three noise draws moved 6, 12 and 12
probabilities past 0.1 but their mean error only 0.0067-0.0084 (the graph 0.0092)."""

ROW_FLOOR = 0.01
ROW_SLACK_ROWS = 2
ROW_NOISE_GRAY_LEVELS = 0.25
ROW_NOISE_DRAWS = 2
ROW_LINES = ("rois.score", "rois.deltas", "rois.order", "boxes", "labels", "rois.rows", "logits", "probs")
"""Lines that follow the discrete ranking, judged in aggregate against the model's own
movement (``s.logits``, S on the graph's own rows, and ``probs.softmax`` stay exact)."""

TENSOR_SLICES = 4


class FakeQuantRunner(TorchRunner):
    """:class:`TorchRunner` of the checkpoint with ModelOpt fake-quantization as the graph has
    it (:func:`~ctmask.exporter.int8_graph.read_quantization`: int8 weights of exactly the
    graph's int8 modules, activations at its scales): the PyTorch model an INT8 graph should equal."""

    def __init__(self, checkpoint, quantization: GraphQuantization, **kwargs):
        super().__init__(checkpoint, **kwargs)
        self.quantization = quantization
        self.name = f"torch-fakequant-{self.device}"

    def activate_impl(self):
        from ctmask.training.qat import wrap_detector

        spec = super().activate_impl()
        wrap_detector(self.module.model.detector, self.quantization.amax, weights=self.quantization.weights,
                      residual=self.quantization.residual)
        return spec

    def describe(self) -> dict:
        import modelopt

        return {**super().describe(), "fake_quantization": f"nvidia-modelopt {modelopt.__version__}",
                "activation_quantizers": len(self.quantization.amax), "int8_weights": len(self.quantization.weights),
                "residual": self.quantization.residual}


def compare_tensors(proto: onnx.ModelProto, reference: FakeQuantRunner, images: np.ndarray) -> dict:
    """``int8.tensors``: the graph's dequantized dense-block activations against the
    fake-quantized model's quantizer outputs, in int8 steps, on ``images`` (a few slices).

    The graph runs on onnxruntime's CPU provider with those tensors added as outputs.
    """
    import torch

    from ctmask.exporter.sensitivity import run_graph
    from ctmask.training.qat import quantizers

    acts = [a for a in reference.quantization.activations.values()
            if all(q.startswith(DENSE_MODULES) for q in a.quantizers)]
    if not acts:
        return _not_compared(len(images), "the graph quantizes no backbone, FPN or RPN head activation", passed=True)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(a.dequantized, onnx.TensorProto.FLOAT, None)
                              for a in acts)
    try:
        graph_values = run_graph(probe, images)
    except Exception as exc:  # onnxruntime refuses the graph with its tensors as outputs (its own error types)
        return _not_compared(len(images), f"onnxruntime could not run the graph's quantized tensors: {exc}",
                             passed=False)
    del probe
    captured: dict[str, list[np.ndarray]] = {}
    modules = quantizers(reference.module.model.detector)
    wanted = {q for a in acts for q in a.quantizers}

    def keep(name: str) -> Callable:
        # a copy: an in-place ReLU after a BatchNorm's output quantizer would rewrite a view
        return lambda _m, _i, out: captured.setdefault(name, []).append(out.detach().float().cpu().numpy().copy())

    hooks = [modules[q].register_forward_hook(keep(q)) for q in wanted if q in modules]
    try:
        with torch.inference_mode():
            reference.module(torch.from_numpy(images).to(reference.device))
    finally:
        for h in hooks:
            h.remove()
    total = beyond = other_point = 0
    worst_steps, worst = 0.0, ""
    unmatched = []
    for a in acts:
        g = graph_values[a.dequantized]
        r = next((v for q in sorted(a.quantizers) for v in captured.get(q, []) if v.shape == g.shape), None)
        if r is None:
            unmatched.append(a.tensor)
            continue
        steps = np.abs(g.astype(np.float64) - r) / a.scale
        total += steps.size
        beyond += int((steps > 1.5).sum())
        other_point += int((steps > 0.5).sum())
        if steps.max() > worst_steps:
            worst_steps, worst = float(steps.max()), sorted(a.quantizers)[0]
    fraction = beyond / total if total else 1.0
    return {"tensors": len(acts) - len(unmatched), "values": total, "slices": len(images),
            "beyond_one_step": fraction, "another_grid_point": other_point / total if total else 1.0,
            "max_steps": worst_steps, "worst_quantizer": worst,
            "unmatched": unmatched, "limits": dict(TENSOR_LIMITS),
            "passed": bool(total and not unmatched and fraction <= TENSOR_LIMITS["beyond_one_step"]
                           and worst_steps <= TENSOR_LIMITS["max_steps"])}


def _not_compared(slices: int, why: str, passed: bool) -> dict:
    """``int8.tensors`` when nothing was compared: passed (nothing to compare) or failed (the
    graph's tensors could not be read), every fraction at its best or worst value."""
    worst = 0.0 if passed else 1.0
    return {"tensors": 0, "values": 0, "slices": slices, "beyond_one_step": worst, "another_grid_point": worst,
            "max_steps": 0.0, "worst_quantizer": "", "unmatched": [], "limits": dict(TENSOR_LIMITS),
            "passed": passed, "not_compared": why}


def compare_weights(proto: onnx.ModelProto, reference: FakeQuantRunner) -> dict:
    """``int8.weights``: every int8 weight of the graph, dequantized, against the checkpoint's
    weight of its module (BatchNorm folded in where the graph folds it), in the graph's own
    per-channel steps. A correct quantization rounds each weight to its nearest step: at most
    half a step off (:data:`WEIGHT_LIMIT_STEPS`). Other weights, a scale that does not match
    the stored integers, a transposed or reshaped weight fail."""
    import torch

    from ctmask.exporter.int8_graph import GraphIndex
    from ctmask.training.qat import module_of_weight, output_owner

    g = GraphIndex(proto)
    modules = dict(reference.module.model.detector.named_modules())
    worst, worst_module, checked, problems = 0.0, "", set(), []
    for dq in proto.graph.node:
        if dq.op_type != "DequantizeLinear" or g.op(dq.input[0]) not in ("", "Constant"):
            continue  # an activation's (it reads a QuantizeLinear)
        module = module_of_weight(dq.input[0].removesuffix("_quantized"))
        if module is None or module not in reference.quantization.weights:
            continue
        dequantized = _dequantized_weight(g, dq)
        if isinstance(dequantized, str):
            problems.append(f"{module}: {dequantized}")
            continue
        graph_w, step = dequantized
        with torch.no_grad():
            w = modules[module].weight.detach().double()
            owner = output_owner(module)
            if owner != module:  # the graph folds this BatchNorm into the convolution
                bn = modules[owner]
                w = w * (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).view(-1, 1, 1, 1)
        w = w.cpu().numpy()
        if w.shape != graph_w.shape and w.T.shape == graph_w.shape:
            w = w.T
        if w.shape != graph_w.shape:
            problems.append(f"{module}: shape {list(graph_w.shape)} in the graph, {list(w.shape)} in the checkpoint")
            continue
        off = float((np.abs(graph_w - w) / step).max())
        if not np.isfinite(off):
            problems.append(f"{module}: non-finite weights")
            continue
        checked.add(module)
        if off > worst:
            worst, worst_module = off, module
    problems += [f"{m}: int8 in the graph, but no int8 weight of it was found to check"
                 for m in sorted(reference.quantization.weights - checked - {p.split(":")[0] for p in problems})]
    return {"weights": len(checked), "max_steps": worst, "worst_module": worst_module, "problems": problems,
            "mismatched_grids": reference.quantization.mismatched_grids(),
            "limit_steps": WEIGHT_LIMIT_STEPS,
            "passed": bool(checked and not problems and worst <= WEIGHT_LIMIT_STEPS)}


def _dequantized_weight(g, dq: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | str:
    """(the weight a DequantizeLinear of a constant gives, its per-channel step broadcast to it),
    or what is wrong with it."""
    stored = g.constant(dq.input[0])
    scale = g.constant(dq.input[1]) if len(dq.input) > 1 else None
    if stored is None or scale is None or stored.ndim == 0:
        return "a non-constant weight or scale"
    zero = g.constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(scale.shape, stored.dtype)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % stored.ndim
    if scale.size not in (1, stored.shape[axis]) or zero is None or zero.shape != scale.shape:
        return (f"scale {list(scale.shape)} and zero-point {list(zero.shape) if zero is not None else 'non-constant'} "
                f"do not fit a weight {list(stored.shape)} quantized along axis {axis}")
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        return "a non-finite or non-positive scale"
    shape = [1] * stored.ndim
    shape[axis] = -1
    step = np.asarray(scale, np.float64).reshape(shape if scale.size > 1 else [1] * stored.ndim)
    return (stored.astype(np.float64) - np.asarray(zero, np.float64).reshape(step.shape)) * step, step


def row_stats(judged: list) -> dict[str, tuple[float, float]]:
    """Each :data:`ROW_LINES` line over judged slices (:func:`~ctmask.exporter.parity.judge_slices`):
    (mean absolute error over all its judged values, the largest per-slice mean); for
    ``rois.rows`` (bad rows in all, the most on one slice): rows missing, intruding, unmatched
    or badly padded."""
    out = {}
    for name in ROW_LINES:
        if name == "rois.rows":
            per = np.array([j.alignment.bad_rows for j in judged], np.float64)
            out[name] = (float(per.sum()), float(per.max(initial=0.0)))
            continue
        diffs = [np.abs(np.ravel(a).astype(np.float64) - np.ravel(e)) for a, e in (j.pairs[name] for j in judged)]
        every = np.concatenate(diffs) if diffs else np.zeros(0)
        out[name] = (float(every.mean()) if every.size else 0.0,
                     max((float(d.mean()) for d in diffs if d.size), default=0.0))
    return out


def own_movement(reference: TorchRunner, images: np.ndarray, expected: dict[str, np.ndarray],
                 tol: dict[str, Tolerance], batch_size: int, gray_levels: float = ROW_NOISE_GRAY_LEVELS) -> dict:
    """How far the reference moves from its clean run on each row line (:func:`row_stats`,
    judged as a graph would be), the largest over :data:`ROW_NOISE_DRAWS` draws of seeded
    uniform input noise of +-``gray_levels`` gray levels."""
    from ctmask.exporter.parity import judge_slices

    moved: dict[str, tuple[float, float]] = {}
    for seed in range(ROW_NOISE_DRAWS):
        run = reference.infer_batches(add_gray_noise(images, gray_levels, seed=seed), batch_size)
        for name, (mean, worst) in row_stats(judge_slices(run, expected, tol, reference.classify)).items():
            before = moved.get(name, (0.0, 0.0))
            moved[name] = (max(before[0], mean), max(before[1], worst))
    return moved


def judge_rows(judged: list, moved: dict[str, tuple[float, float]], tol: dict[str, Tolerance]) -> dict:
    """Each row line's verdict: the graph's error (over all slices, and on its worst slice)
    against the model's own movement under the noise (over all slices, and on its worst)."""
    graph = row_stats(judged)
    out = {}
    for name in ROW_LINES:
        floor = ROW_SLACK_ROWS if name == "rois.rows" else ROW_FLOOR * tol[name].atol if name in tol else 0.0
        allowed = [ROW_FACTOR * m + floor for m in moved[name]]
        out[name] = {"graph": graph[name][0], "reference_under_noise": moved[name][0], "allowed": allowed[0],
                     "graph_worst_slice": graph[name][1], "reference_worst_slice": moved[name][1],
                     "allowed_worst_slice": allowed[1],
                     "passed": graph[name][0] <= allowed[0] and graph[name][1] <= allowed[1],
                     "measure": "bad rows" if name == "rois.rows" else "mean abs error"}
    return out


def apply_int8_reference(report: dict, rows: dict, tensors: dict, weights: dict, flips: np.ndarray,
                         min_agreement: float) -> None:
    """Rewrite a report judged against the fake-quantized model (in place): row lines by
    :func:`judge_rows`, ``int8.tensors``, and ``class`` against PyTorch FP32 (``flips``: per
    slice, the graph's call differs from PyTorch FP32's). Every failing slice stays listed,
    its ``class`` mark now against FP32."""
    failures = [f for f in report["failures"] if f not in ROW_LINES and f != "class"]
    failures += [name for name, r in rows.items() if not r["passed"]]
    if len(flips) < MIN_SLICES:
        failures.append("int8.slices")
    if not tensors["passed"]:
        failures.append("int8.tensors")
    if not weights["passed"]:
        failures.append("int8.weights")
    if weights.get("mismatched_grids"):
        failures.append("int8.grids")
    for name in ROW_LINES:
        if name in report["outputs"]:
            report["outputs"][name]["judged_in_aggregate"] = True  # its own "passed" is element-wise
    agreement = float(1.0 - np.mean(flips)) if len(flips) else 1.0
    report["argmax_agreement_fakequant"] = report["argmax_agreement"]
    report["argmax_agreement"] = agreement
    if agreement < min_agreement:
        failures.append("class")
    listed = {}
    for f in report["failing_slices"]:
        listed[f["index"]] = {**f, "max_abs": {k: v for k, v in f["max_abs"].items() if k != "class"}}
    for i in np.flatnonzero(flips):
        listed.setdefault(int(i), {"index": int(i), "max_abs": {}, "reference_logits": "torch FP32 end to end"})
        listed[int(i)]["max_abs"]["class"] = 1.0
    report["failing_slices"] = [listed[i] for i in sorted(listed) if listed[i]["max_abs"]]
    report["int8_reference"] = {"reference": "fake-quantized checkpoint at the graph's scales", "rows": rows,
                                "row_noise_gray_levels": ROW_NOISE_GRAY_LEVELS, "row_noise_draws": ROW_NOISE_DRAWS,
                                "row_factor": ROW_FACTOR, "row_floor": ROW_FLOOR, "row_slack_rows": ROW_SLACK_ROWS,
                                "tensors": tensors, "weights": weights, "min_slices": MIN_SLICES}
    report["failures"] = failures
    report["passed"] = not failures
