"""Parity, run: the PyTorch reference of a checkpoint and the graph under test, each in the
runner the registry makes for it (:mod:`ctmask.backends.registry`), on the same slices; the
outputs are judged by :mod:`ctmask.exporter.parity` (the definition and its maths), and the
report adds what surrounds the verdict: the graph's contents against its declared
precision, metadata and provenance checks, class calls against the FP32 graph and labels,
the model's noise floor, and Polygraphy files.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctmask.backends.registry import graph_runner
from ctmask.core.errors import ConfigError, ModelError
from ctmask.core.fileio import atomic_path, sha256_file
from ctmask.core.graphs import content_sha256, load_proto, precision_problems
from ctmask.core.noise import NOISE_GRAY_LEVELS, NoiseFloor
from ctmask.core.spec import INPUT, PARITY_AGREEMENT, PARITY_OFF_TOLERANCE, GraphSpec, Tolerance, parity_tolerances
from ctmask.exporter.int8_graph import GraphQuantization, read_quantization
from ctmask.exporter.int8_reference import (
    TENSOR_SLICES,
    FakeQuantRunner,
    apply_int8_reference,
    compare_tensors,
    compare_weights,
    judge_rows,
    own_movement,
)
from ctmask.exporter.parity import (
    CANDIDATES,
    SliceJudgement,
    judge_parity,
    judge_slices,
    probe_stability,
    take_rows,
)
from ctmask.exporter.reference import TorchRunner
from ctmask.runtime.predict import collect_images
from ctmask.runtime.runner import OnnxRuntimeRunner, Runner
from ctmask.scans.batch import load_batch
from ctmask.scans.types import Failure


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(start, start + batch_size) for start in range(0, n, batch_size)]



SERVED_METADATA = ("class_names", "crop", "resize", "window", "head", "suppression")
"""Graph metadata the runtime acts on or reports (``train-cls --rois-from`` reads the
suppression), which must equal the checkpoint's (``metadata`` line): a graph claiming the pooled
head while holding the paper's S, or hard NMS while it decays, fails here."""


def run_pair(reference: Runner, candidate: Runner, images: np.ndarray, batch_size: int,
             on_batch: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """Run both active runners on ``images`` [M, 1, S, S] in batches; concatenate outputs."""
    ref: dict[str, list] = {}
    cand: dict[str, list] = {}
    for batch in _batches(len(images), batch_size):
        feed = {INPUT: np.ascontiguousarray(images[batch])}
        for store, runner in ((ref, reference), (cand, candidate)):
            for k, v in runner.infer(feed).items():
                store.setdefault(k, []).append(v)
        if on_batch:
            on_batch(len(feed[INPUT]))
    return ({k: np.concatenate(v) for k, v in ref.items()}, {k: np.concatenate(v) for k, v in cand.items()})



def source_graph(model: str | Path, notes: list[str]) -> Path | None:
    """The ONNX file whose contents parity checks against the declared precision: the model
    itself, or for an engine the graph it was built from, when that file is still there
    unchanged (otherwise a note says the contents were not re-checked)."""
    from ctmask.trt.engine import is_engine_path, read_sidecar

    if not is_engine_path(model):
        return Path(model)
    info = read_sidecar(model)
    onnx_file = Path(info.onnx_file) if info.onnx_file else None
    if onnx_file is not None and onnx_file.is_file() and sha256_file(onnx_file) == info.onnx_sha256:
        return onnx_file
    notes.append(f"the ONNX graph {model} was built from ({info.onnx_file or 'unnamed'}, sha256 "
                 f"{info.onnx_sha256[:12]}...) is not at hand unchanged: its contents were not re-checked against "
                 "its declared precision")
    return None


def check_parity(
    checkpoint: str | Path,
    model: str | Path,
    inputs: list[str | Path],
    max_images: int = 64,
    batch_size: int = 8,
    min_argmax_agreement: float | None = None,
    polygraphy_dir: str | Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    jitter: float = 1e-6,
    max_unstable_fraction: float = 0.05,
    fp32_model: str | Path | None = None,
    labels: str | Path | None = None,
    noise_levels: tuple[float, ...] = NOISE_GRAY_LEVELS,
) -> dict:
    """PyTorch (checkpoint) against the graph (model, in the runner the registry makes for it:
    onnxruntime, or TensorRT for an engine) on up to ``max_images`` slices.

    Args:
        checkpoint: classifier checkpoint the model was exported from.
        model: ctmask ONNX file, or TensorRT engine.
        inputs: image files or folders.
        max_images: slices used (the first ones, in sorted order).
        batch_size: slices per inference call.
        min_argmax_agreement: fraction of slices whose predicted class must agree (default:
            ctmask's ``PARITY_AGREEMENT`` for the graph's precision: 100% FP32, 99.5% FP16,
            99% INT8).
        polygraphy_dir: if given, also write the inputs and the PyTorch outputs there in
            Polygraphy's JSON formats, for ``polygraphy run --load-inputs/--load-outputs``.
        on_batch: progress callback (slices done in the batch).
        on_start: called once with the number of slices about to be compared.
        jitter: input noise of the stability probe (:func:`~ctmask.exporter.parity.probe_stability`); 0 turns
            it off. Unstable slices are reported and judged out, up to
            ``max_unstable_fraction`` of the slices; beyond that the check fails. FP32 only:
            FP16 / INT8 graphs may instead be off tolerance on ``PARITY_OFF_TOLERANCE`` of
            the slices (:func:`~ctmask.exporter.parity.judge_parity`).
        fp32_model: the FP32 graph a reduced-precision graph was made from: its class calls
            (and accuracy) are reported beside the graph's.
        labels: a COVIDx-CT split file naming the slices' classes: accuracy of PyTorch, the
            graph (and the FP32 graph) is reported, and the graph's change against FP32.
        noise_levels: the model's noise floor (:mod:`ctmask.core.noise`): PyTorch's own calls
            under seeded input noise of each amplitude (gray levels), reported as
            ``noise_floor`` beside the agreement it puts in proportion; ``()`` skips it.

    Returns:
        the report of :func:`~ctmask.exporter.parity.judge_parity` plus ``model``, ``checkpoint``, ``n_images``,
        ``precision``, ``tolerances`` (ctmask's table for it), ``skipped`` (unreadable
        files), ``warnings``, and the runners' descriptions.

    Raises:
        ModelError: the graph and the checkpoint are of different presets, or the graph
            declares a precision ctmask has no tolerances for.
    """
    files, skipped = collect_images(inputs)
    notes: list[str] = []
    graph_file = source_graph(model, notes)
    with graph_runner(model) as candidate:
        quantization = int8_quantization(candidate.spec, graph_file, notes)
        with _reference(checkpoint, quantization) as reference, \
                (TorchRunner(checkpoint) if quantization else contextlib.nullcontext(reference)) as fp32_ref:
            setup = _prepare(candidate.spec, reference.spec, model, checkpoint, graph_file, notes,
                             min_argmax_agreement, fakequant=quantization is not None)
            images, ok, skipped = _load_slices(files[:max_images], skipped, setup.spec, on_start)
            expected, actual = run_pair(reference, candidate, images, batch_size, on_batch)
            runners = {"reference": reference.describe(), "candidate": candidate.describe()}
            _check_output_shapes(actual, setup.spec, len(ok), model)
            report, judged = _judge(reference, images, expected, actual, setup, jitter, max_unstable_fraction)
            fp32 = judge_against_fakequant(report, judged, reference, fp32_ref, graph_file, images, expected, setup,
                                           actual, batch_size, runners)
            report["decisions"] = decisions_report(ok, fp32, actual, setup.spec, model, fp32_model, labels, images,
                                                   batch_size)
            if noise_levels:
                report["noise_floor"] = reference_noise_floor(fp32_ref, images, fp32, batch_size, noise_levels)
    judged_reference = report.pop("judged_reference")
    _finish(report, setup, ok)
    if polygraphy_dir is not None:
        save_for_polygraphy(polygraphy_dir, images, judged_reference, batch_size,
                            "pytorch-fakequant" if setup.fakequant else "pytorch")
    return {**_header(model, checkpoint, setup, expected, len(ok), batch_size, skipped, runners), **report}


def _finish(report: dict, setup: _Setup, files: list[Path]) -> None:
    """Add the metadata verdict and the failing slices' file names to ``report``."""
    report["metadata_mismatches"] = setup.mismatches
    if setup.mismatches:
        report["failures"].append("metadata")
        report["passed"] = False
    for item in report["failing_slices"] + report["probed_slices"]:
        item["file"] = str(files[item["index"]])


@dataclass
class _Setup:
    """What parity judges a graph by, once the graph and its checkpoint are known to match."""

    spec: GraphSpec
    ref_spec: GraphSpec
    tol: dict[str, Tolerance]
    min_argmax_agreement: float
    off_tolerance: float
    mismatches: dict[str, dict]
    warnings: list[str]
    fakequant: bool = False


def _prepare(spec: GraphSpec, ref_spec: GraphSpec, model: str | Path, checkpoint: str | Path,
             graph_file: Path | None, notes: list[str], min_argmax_agreement: float | None,
             fakequant: bool = False) -> _Setup:
    """Check the graph against its checkpoint (preset, contents against the declared
    precision) and gather the tolerances, the metadata mismatches and the warnings.

    Raises:
        ModelError: other presets, no tolerances for the declared precision, or contents
            that contradict the metadata.
    """
    if (spec.preset, spec.image_size, spec.n_rois) != (ref_spec.preset, ref_spec.image_size, ref_spec.n_rois):
        raise ModelError(f"graph is preset {spec.preset!r} ({spec.image_size} px, N={spec.n_rois}) but the "
                         f"checkpoint is preset {ref_spec.preset!r} ({ref_spec.image_size} px, "
                         f"N={ref_spec.n_rois})", model)
    tol = parity_tolerances(spec.precision, model)
    if graph_file is not None:
        proto = load_proto(graph_file)
        reduced = json.loads({p.key: p.value for p in proto.metadata_props}.get("ctmask.reduced_blocks", "null"))
        contradictions = precision_problems(proto, spec, reduced if isinstance(reduced, list) else None)
        del proto
        if contradictions:
            raise ModelError("the graph's contents contradict its metadata: " + "; ".join(contradictions),
                             graph_file)
    if min_argmax_agreement is None:
        min_argmax_agreement = PARITY_AGREEMENT[spec.precision]
    # What the runtime reads from the graph's metadata must be what the model was trained with.
    mismatches = {name: {"graph": getattr(spec, name), "checkpoint": getattr(ref_spec, name)}
                  for name in SERVED_METADATA if getattr(spec, name) != getattr(ref_spec, name)}
    # Against the fake-quantized model, the row lines are judged in aggregate instead of
    # excusing a share of the slices (ctmask.exporter.int8_reference).
    return _Setup(spec, ref_spec, tol, min_argmax_agreement,
                  0.0 if fakequant else PARITY_OFF_TOLERANCE[spec.precision], mismatches,
                  _warnings(notes, spec, ref_spec, tol, model, checkpoint), fakequant)


def _warnings(notes: list[str], spec: GraphSpec, ref_spec: GraphSpec, tol: dict[str, Tolerance],
              model: str | Path, checkpoint: str | Path) -> list[str]:
    """The notes, plus declared tolerances ignored and a graph from another checkpoint or weights."""
    warnings = list(notes)
    declared = spec.declared_tolerances
    if declared is not None and declared != tol:
        warnings.append(f"{model} declares its own parity tolerances; they are ignored: ctmask judges a "
                        f"{spec.precision} graph by its own table")
    ref_sha = sha256_file(checkpoint)
    if spec.checkpoint_sha256 and spec.checkpoint_sha256 != ref_sha:
        warnings.append(f"{model} was exported from a different checkpoint (sha256 {spec.checkpoint_sha256[:12]}"
                        f"..., {checkpoint} is {ref_sha[:12]}...)")
    if spec.weights_sha256 and ref_spec.weights_sha256 and spec.weights_sha256 != ref_spec.weights_sha256:
        warnings.append(f"{model} holds other weights than {checkpoint} (weights digest "
                        f"{spec.weights_sha256[:12]}... against {ref_spec.weights_sha256[:12]}...)")
    return warnings


def _load_slices(files: list[Path], skipped: list, spec: GraphSpec,
                 on_start: Callable[[int], None] | None) -> tuple[np.ndarray, list[Path], list]:
    """The slices as the graph's input, the files read, and every file skipped so far.

    Raises:
        ConfigError: no slice could be read.
    """
    loaded = load_batch(files, spec)
    images, ok, bad = loaded.batch, loaded.paths, loaded.failures
    skipped = skipped + bad
    if not ok:
        raise ConfigError("no readable slices to compare: " + "; ".join(f"{f.file}: {f.reason}" for f in skipped))
    if on_start:
        on_start(len(ok))
    return images, ok, skipped


def _check_output_shapes(actual: dict[str, np.ndarray], spec: GraphSpec, n: int, model: str | Path) -> None:
    """Refuse a graph whose outputs do not have the shapes its metadata declares."""
    wrong = {k: list(actual[k].shape) if k in actual else "missing"
             for k, shape in spec.output_shapes(n).items() if k not in actual or actual[k].shape != shape}
    if wrong:
        raise ModelError(f"graph outputs {wrong} do not have the shapes its metadata declares "
                         f"{ {k: list(v) for k, v in spec.output_shapes(n).items()} }", model)


def _judge(reference: TorchRunner, images: np.ndarray, expected: dict[str, np.ndarray],
           actual: dict[str, np.ndarray], setup: _Setup, jitter: float,
           max_unstable_fraction: float) -> tuple[dict, list[SliceJudgement]]:
    """:func:`~ctmask.exporter.parity.judge_parity`, with PyTorch's stability probe (FP32, ``jitter`` > 0),
    and the judged slices it worked from."""

    def probe(indices: list[int]) -> dict[int, dict[str, float]]:
        return probe_stability(reference, images, expected, indices, setup.tol, jitter)

    probing = jitter > 0 and setup.off_tolerance == 0 and not setup.fakequant
    judged = judge_slices(actual, expected, setup.tol, reference.classify)
    return judge_parity(actual, expected, setup.tol, reference.classify, setup.min_argmax_agreement,
                        probe if probing else None, max_unstable_fraction, setup.off_tolerance, judged), judged


def _header(model: str | Path, checkpoint: str | Path, setup: _Setup, expected: dict[str, np.ndarray], n: int,
            batch_size: int, skipped: list, runners: dict) -> dict:
    """The report's first keys: what was compared, how, and what was left out."""
    return {
        "model": str(model),
        "checkpoint": str(checkpoint),
        "preset": setup.spec.preset,
        "precision": setup.spec.precision,
        "tolerances": {k: t.to_dict() for k, t in setup.tol.items()},
        "reference_candidates": int(expected["candidates"].shape[1] - setup.spec.n_rois),
        "n_images": n,
        "batch_size": batch_size,
        "skipped": [f.to_dict() for f in skipped if isinstance(f, Failure)],
        "warnings": setup.warnings,
        "runners": runners,
        "head": setup.ref_spec.head,
    }


def _reference(checkpoint: str | Path, quantization: GraphQuantization | None) -> TorchRunner:
    """The reference runner: the checkpoint fake-quantized as the graph is, or PyTorch FP32."""
    if quantization is not None:
        return FakeQuantRunner(checkpoint, quantization, candidates=CANDIDATES)
    return TorchRunner(checkpoint, candidates=CANDIDATES)


def int8_quantization(spec: GraphSpec, graph_file: Path | None, notes: list[str]) -> GraphQuantization | None:
    """An INT8 graph's quantization as ModelOpt quantizers (its fake-quantized reference), or
    None (with a note why its rows are judged against PyTorch FP32 instead)."""
    if spec.precision != "int8":
        return None
    fallback = "its rows are judged against PyTorch FP32, where rounding reorders candidates on most slices"
    if graph_file is None:
        notes.append(f"INT8 without its ONNX graph at hand: {fallback}")
        return None
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        notes.append(f"the fake-quantized INT8 reference needs NVIDIA ModelOpt (pip install 'ctmask[qat]'): "
                     f"{fallback}")
        return None
    quantization, why = read_quantization(load_proto(graph_file))
    if quantization is None:
        notes.append(f"no fake-quantized INT8 reference ({why}): {fallback}")
    return quantization


def judge_against_fakequant(report: dict, judged: list[SliceJudgement], reference: TorchRunner,
                            fp32_ref: TorchRunner, graph_file: Path | None, images: np.ndarray,
                            expected: dict[str, np.ndarray], setup: _Setup, actual: dict[str, np.ndarray],
                            batch_size: int, runners: dict) -> dict[str, np.ndarray]:
    """The PyTorch FP32 logits the decisions are judged against (``{"logits": ...}``). For an
    INT8 graph judged against its fake-quantized model (``setup.fakequant``), also its verdict,
    in place (see :mod:`ctmask.exporter.int8_reference`): the row lines against the model's
    own movement under input noise (``judged``: the graph's slices as :func:`_judge` judged
    them), ``int8.tensors`` on the first slices, the class against PyTorch FP32 (``fp32_ref``)."""
    if not setup.fakequant:
        return {"logits": expected["logits"]}
    fp32_logits = fp32_ref.infer_batches(images, batch_size)["logits"]
    runners["reference_fp32"] = fp32_ref.describe()
    moved = own_movement(reference, images, expected, setup.tol, batch_size)
    proto = load_proto(graph_file)
    tensors = compare_tensors(proto, reference, np.ascontiguousarray(images[:TENSOR_SLICES]))
    weights = compare_weights(proto, reference)
    flips = actual["logits"].argmax(-1) != fp32_logits.argmax(-1)
    apply_int8_reference(report, judge_rows(judged, moved, setup.tol), tensors, weights, flips,
                         setup.min_argmax_agreement)
    return {"logits": fp32_logits}


def reference_noise_floor(reference: TorchRunner, images: np.ndarray, expected: dict[str, np.ndarray],
                          batch_size: int, levels: tuple[float, ...]) -> dict:
    """PyTorch's own class calls under seeded input noise (:class:`ctmask.core.noise.NoiseFloor`)."""
    floor = NoiseFloor(levels)
    for b in _batches(len(images), batch_size):
        floor.measure(lambda x: reference.infer({INPUT: x})["logits"], images[b], expected["logits"][b])
    return floor.to_dict()


def slice_labels(files: list[Path], split: str | Path) -> np.ndarray:
    """Class of each file from a COVIDx-CT split (by resolved path, else by file name); -1 if absent."""
    from ctmask.data.covidx import read_split

    entries = read_split(split, check_exists=False)
    by_path = {e.path.resolve(): e.label for e in entries}
    by_name = {e.path.name: e.label for e in entries}
    return np.array([by_path.get(Path(f).resolve(), by_name.get(Path(f).name, -1)) for f in files])


def decisions_report(files: list[Path], expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                     spec: GraphSpec, model: str | Path, fp32_model: str | Path | None,
                     labels: str | Path | None, images: np.ndarray, batch_size: int) -> dict:
    """Class calls of the graph against PyTorch FP32 (``expected["logits"]``; and the FP32
    graph), accuracy with labels."""
    calls = {"pytorch_fp32": expected["logits"].argmax(-1), spec.precision: actual["logits"].argmax(-1)}
    out: dict = {"precision": spec.precision,
                 "agreement_vs_pytorch_fp32": float(np.mean(calls[spec.precision] == calls["pytorch_fp32"])),
                 "changed_vs_pytorch_fp32": int(np.sum(calls[spec.precision] != calls["pytorch_fp32"]))}
    if fp32_model is not None:
        with OnnxRuntimeRunner(fp32_model) as fp32:  # the FP32 ONNX graph, whatever its suffix
            if fp32.spec.precision != "fp32" or fp32.spec.preset != spec.preset:
                raise ModelError(f"--fp32 must be the FP32 graph of the same preset; it is {fp32.spec.precision}, "
                                 f"preset {fp32.spec.preset}", fp32_model)
            if spec.precision != "fp32" and content_sha256(load_proto(fp32_model)) != spec.source_sha256:
                raise ModelError(f"{model} was not made from this FP32 graph (its source's content sha256 is "
                                 f"{spec.source_sha256[:12] or 'missing'}...)", fp32_model)
            logits = fp32.infer_batches(images, batch_size)["logits"]
        calls["fp32_graph"] = logits.argmax(-1)
        out["agreement_vs_fp32_graph"] = float(np.mean(calls[spec.precision] == calls["fp32_graph"]))
        out["changed_vs_fp32_graph"] = int(np.sum(calls[spec.precision] != calls["fp32_graph"]))
    if labels is not None:
        y = slice_labels(files, labels)
        known = y >= 0
        out["labelled"] = int(known.sum())
        if known.any():
            acc = {k: float(np.mean(v[known] == y[known])) for k, v in calls.items()}
            out["accuracy"] = acc
            base = acc.get("fp32_graph", acc["pytorch_fp32"])
            out["accuracy_change_vs_fp32"] = acc[spec.precision] - base
    return out


def save_for_polygraphy(out_dir: str | Path, images: np.ndarray, expected: dict[str, np.ndarray],
                        batch_size: int, runner_name: str = "pytorch") -> dict[str, Path]:
    """Write ``inputs.json`` and ``reference_outputs.json`` (runner ``runner_name``: "pytorch",
    or "pytorch-fakequant" for an INT8 graph's fake-quantized reference) for Polygraphy.

    ``expected`` should be the judged reference (PyTorch's rows, and the logits each
    slice was judged against); Polygraphy compares elementwise, so judge ``rois`` there
    with a robust statistic (median).

    Raises:
        ConfigError: Polygraphy is not installed.
    """
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.json import save_json
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise ConfigError("writing Polygraphy files needs polygraphy: pip install polygraphy") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = _batches(len(images), batch_size)
    feeds = [{INPUT: np.ascontiguousarray(images[b])} for b in batches]
    outs = [{k: np.ascontiguousarray(v) for k, v in take_rows(expected, b).items()} for b in batches]
    paths = {"inputs": out_dir / "inputs.json", "outputs": out_dir / "reference_outputs.json"}
    G_LOGGER.module_severity = G_LOGGER.ERROR  # its "[I] Saving ..." lines would mix into our output
    results = RunResults()
    results.add(outs, runner_name=runner_name)
    with atomic_path(paths["inputs"]) as tmp:
        save_json(feeds, str(tmp), description="ctmask parity inputs")
    with atomic_path(paths["outputs"]) as tmp:
        results.save(str(tmp))
    return paths
