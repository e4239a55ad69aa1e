"""``ctmask export --precision fp16|int8``: the FP32 graph, then its reduced-precision form.

1. The FP32 graph is traced and checked exactly as ``--precision fp32`` would write it;
   its sha256 identifies it (ranges and sensitivity reports are tied to it).
2. INT8 needs activation ranges: a ranges file (checked against that sha256; nothing is
   calibrated) or a folder / split file (calibrated now; the ranges are saved beside the
   output for the next export).
3. The FP32 islands come from a sensitivity measurement on the calibration slices
   (:mod:`ctmask.exporter.sensitivity`), from a saved report (``--islands``), or, for
   experiments, from an explicit ``--fp32-blocks`` list (recorded as not measured).
4. The reduced graph gets the spec with its precision, its islands and why, its source's
   sha256 and (INT8) its target and calibration; it is checked like the FP32 graph and
   written atomically, then the ranges and report files.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from ctmask.calibration.ranges import CALIBRATE_HINT, RESIDUAL_FORMS, RangesFile, load_ranges
from ctmask.core.errors import ConfigError, DataError
from ctmask.core.fileio import write_json_atomic
from ctmask.core.graphs import content_sha256
from ctmask.core.spec import OPSET, PARITY_AGREEMENT, GraphSpec, parity_tolerances
from ctmask.exporter.onnx_export import ExportResult, set_metadata, trace_checked, verify_graph, write_graph
from ctmask.exporter.precision import (
    BLOCKS,
    INT8_TARGETS,
    PRECISIONS,
    fp16_initializers,
    qdq_summary,
    residual_form,
)
from ctmask.exporter.sensitivity import ALWAYS_FP32, IslandChoice, choose_islands, node_reducer, reducer

REPORT_FORMAT = "ctmask-precision-report/1"


@dataclass
class ReducedOptions:
    """How to make a reduced-precision graph.

    Attributes:
        precision: ``fp16`` or ``int8``.
        calibration: a ranges file (``.json``), a folder of slices, a COVIDx-CT split file
            or a ``ctmask synth`` folder; INT8 needs it, FP16 measures its islands on it.
        int8_target: ``tensorrt`` (int8 symmetric activations, zero-point 0) or ``cpu``
            (uint8 activations).
        islands_report: a precision report (from ``ctmask precision-report`` or an earlier
            export) whose islands are reused instead of measured.
        fp32_blocks: explicit islands (not measured; for experiments and tests).
        size: calibration slices.
        measure_size: sensitivity measurement slices (drawn like the calibration slices;
            enough that the precision's allowed share of changed calls is at least one).
        method: calibration method (``minmax``, ``entropy``, ``percentile``).
        seed: the class-balanced draw's seed.
        residual: INT8: what the residual and top-down paths read (``float`` or ``int8``,
            :data:`ctmask.calibration.ranges.RESIDUAL_FORMS`); None: the ranges file's form (a QAT
            detector's), else ``float``.
    """

    precision: str
    calibration: Path | None = None
    int8_target: str = "tensorrt"
    islands_report: Path | None = None
    fp32_blocks: tuple[str, ...] | None = None
    size: int = 64
    measure_size: int = 200
    method: str = "minmax"
    seed: int = 0
    residual: str | None = None

    def check(self) -> None:
        if self.precision not in PRECISIONS or self.precision == "fp32":
            raise ConfigError(f"reduced precision must be fp16 or int8, got {self.precision!r}")
        if self.int8_target not in INT8_TARGETS:
            raise ConfigError(f"unknown --int8-target {self.int8_target!r}; expected one of {', '.join(INT8_TARGETS)}")
        if self.residual is not None and self.residual not in RESIDUAL_FORMS:
            raise ConfigError(f"unknown --residual {self.residual!r}; expected {' or '.join(RESIDUAL_FORMS)}")
        if self.residual is not None and self.precision != "int8":
            raise ConfigError(f"--residual applies to --precision int8, not {self.precision}")
        if self.precision == "int8" and self.calibration is None:
            raise ConfigError("--precision int8 needs calibration data: pass --calibration DIR|SPLIT (calibrates now) "
                              "or --calibration RANGES.json (from `ctmask calibrate`)")
        chosen = [x is not None for x in (self.islands_report, self.fp32_blocks)]
        if all(chosen):
            raise ConfigError("pass either --islands REPORT or --fp32-blocks, not both")
        if not any(chosen) and self.calibration is None:
            raise ConfigError(f"--precision {self.precision} chooses its FP32 islands by measuring on calibration "
                              "slices: pass --calibration DIR|SPLIT, or reuse a measurement with --islands REPORT")
        if self.fp32_blocks is not None:
            _check_known_blocks(self.fp32_blocks)
        if self.size < 1 or self.measure_size < 1:
            raise ConfigError(f"calibration and measurement sizes must be >= 1, got {self.size} and "
                              f"{self.measure_size}")


def parse_fp32_blocks(value: str) -> tuple[str, ...]:
    """``export --fp32-blocks``'s value: the named blocks (each once, in order), or () for ``none``.

    Raises:
        ConfigError: a value that names no block (it would reduce every block, S included,
            silently), ``none`` next to block names, or an unknown block.
    """
    names = tuple(dict.fromkeys(b.strip() for b in value.split(",") if b.strip()))
    if not names:
        raise ConfigError(f"--fp32-blocks {value!r} names no block: pass block names (e.g. classifier,box_head) "
                          "or `none` to reduce every block")
    if names == ("none",):
        return ()
    if "none" in names:
        raise ConfigError(f"--fp32-blocks {value!r}: `none` (reduce every block) cannot go with block names")
    _check_known_blocks(names)
    return names


def _check_known_blocks(names) -> None:
    unknown = sorted(set(names) - set(BLOCKS))
    if unknown:
        raise ConfigError(f"unknown block(s) {unknown} in --fp32-blocks; blocks are {', '.join(BLOCKS)} (or none)")


def is_ranges_file(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def proto_sha256(proto: onnx.ModelProto) -> str:
    """The graph's content sha256 (:func:`ctmask.core.graphs.content_sha256`): what it
    computes, whatever path or ctmask version wrote its metadata."""
    return content_sha256(proto)


def sidecar(out: Path, kind: str) -> Path:
    """``model.int8.onnx`` -> ``model.int8.<kind>.json``."""
    return out.with_name(out.stem + f".{kind}.json")


def load_report(path: Path, precision: str, source_sha256: str, int8_target: str | None = None,
                ranges: RangesFile | None = None) -> dict:
    """A precision report for ``precision`` of the graph with that sha256.

    Raises:
        DataError: unreadable, not a report, another precision or another graph.
    """
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the precision report ({exc.__class__.__name__}: {exc})", path) from None
    if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT:
        raise DataError(f"not a ctmask precision report (format {REPORT_FORMAT!r} expected)", path)
    choice = d.get("choice")
    if not isinstance(choice, dict):
        raise DataError("malformed precision report (no 'choice' object)", path)
    if choice.get("precision") != precision:
        raise DataError(f"the report measured {choice.get('precision')!r}, not {precision}", path)
    if precision == "int8" and int8_target is not None and d.get("int8_target") != int8_target:
        raise DataError(f"the report measured INT8 for the {d.get('int8_target')!r} target, not {int8_target!r} "
                        "(the two Q/DQ flavours move different calls)", path)
    if d.get("source_sha256") != source_sha256:
        raise DataError(f"the report was measured on another graph (sha256 {str(d.get('source_sha256'))[:12]}..., "
                        f"this checkpoint's FP32 graph is {source_sha256[:12]}...)", path,
                        hint="measure again: pass --calibration DIR|SPLIT instead of --islands")
    islands = choice.get("fp32_islands")
    if not isinstance(islands, dict) or not set(islands) <= set(BLOCKS) or \
            not all(isinstance(v, str) for v in islands.values()):
        raise DataError("malformed precision report (fp32_islands)", path)
    calibration = d.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise DataError("malformed precision report (calibration)", path)
    # A report without the key predates the residual form: every earlier export read float.
    form = (calibration or {}).get("residual", "float")
    if form not in RESIDUAL_FORMS:
        raise DataError(f"malformed precision report (calibration.residual {json.dumps(form)}; expected "
                        f"{' or '.join(RESIDUAL_FORMS)})", path)
    if ranges is not None:
        ours = residual_form(ranges)
        if form != ours:
            raise DataError(f"the report measured INT8 with residual paths reading {form!r}, this export reads them "
                            f"{ours!r} (the two forms move different calls)", path,
                            hint="measure again, or export with the report's --residual")
        measured = (calibration or {}).get("ranges_sha256")
        if measured != ranges.content_sha256():
            raise DataError("the report was measured with other INT8 ranges than --calibration gives; its "
                            "measurement would not describe this graph", path,
                            hint="measure again (omit --islands), or pass the ranges the report was made with")
    return d


def _check_before_trace(out: Path, opts: ReducedOptions) -> None:
    """What is refused before the trace: an output path that is a folder or the calibration
    source, a broken ranges file."""
    for path in (out, sidecar(out, "ranges"), sidecar(out, "precision")):
        if path.is_dir():
            raise ConfigError("output path is a folder", path)
    if opts.calibration is not None and out.resolve() == opts.calibration.resolve():
        raise ConfigError("--out would overwrite the calibration source", out)
    _check_ranges_early(opts)


def _check_ranges_early(opts: ReducedOptions) -> None:
    """A ranges file given to INT8 is read before the trace, so a broken one is refused in a second."""
    if opts.precision == "int8" and opts.calibration is not None and is_ranges_file(opts.calibration):
        load_ranges(opts.calibration)


def _ranges_for(proto: onnx.ModelProto, spec: GraphSpec, sha: str, opts: ReducedOptions,
                on_step: Callable[[str], None] | None) -> tuple[RangesFile, bool, object]:
    """(ranges, calibrated now?, calibration set or None)."""
    from ctmask.calibration.collect import collect_ranges
    from ctmask.calibration.slices import calibration_set

    assert opts.calibration is not None
    if is_ranges_file(opts.calibration):
        ranges = load_ranges(opts.calibration)
        ranges.check_graph(sha, opts.calibration, "this checkpoint's FP32 graph",
                           hint=CALIBRATE_HINT + ", or pass a folder / split file to --calibration")
        return ranges, False, None
    cal = calibration_set(opts.calibration, spec, opts.size, opts.seed)
    if on_step:
        on_step(f"calibrating ({opts.method}) on {len(cal.slices)} slices")
    with tempfile.TemporaryDirectory(prefix="ctmask-export-") as tmp:
        path = Path(tmp) / "fp32.onnx"
        onnx.save(proto, str(path))
        ranges = collect_ranges(path, spec, cal, opts.method, proto=proto)
    ranges.graph["file"] = "(traced in memory by ctmask export)"
    return ranges, True, cal


def _measurement_images(spec: GraphSpec, opts: ReducedOptions, ranges: RangesFile | None, cal):
    """The slices the sensitivity is measured on: the calibration set, or the ranges' own slices."""
    from ctmask.calibration.slices import calibration_set, file_sha256

    if cal is not None and len(cal.images) >= opts.measure_size:
        return cal
    assert opts.calibration is not None
    if not is_ranges_file(opts.calibration):
        return calibration_set(opts.calibration, spec, opts.measure_size, opts.seed)
    if ranges is None:  # FP16 measured on the slices a ranges file lists
        ranges = load_ranges(opts.calibration)
    files = [Path(s["file"]) for s in ranges.slices]
    missing = [f for f in files if not f.is_file()]
    changed = [Path(s["file"]) for s in ranges.slices if Path(s["file"]).is_file()
               and s.get("sha256") and file_sha256(Path(s["file"])) != s["sha256"]]
    if missing or changed:
        what = f"no longer exist (e.g. {missing[0]})" if missing else f"have changed since (e.g. {changed[0]})"
        raise DataError(f"the ranges file lists calibration slices that {what}, so the FP32 islands cannot be "
                        "measured on them", opts.calibration,
                        hint="pass --islands REPORT (saved by the first export), --fp32-blocks, or slices to "
                             "--calibration")
    return _slices_from_files(files, spec)


def _slices_from_files(files: list[Path], spec: GraphSpec):
    from ctmask.calibration.slices import CalibrationSet
    from ctmask.scans.batch import load_batch

    if spec.crop:
        raise DataError("the model crops slices to their body box, and a ranges file does not keep the boxes, so the "
                        "FP32 islands cannot be measured on its slices",
                        hint="pass --islands REPORT (saved by the first export), or --calibration SPLIT as well")
    loaded = load_batch(files, spec)
    images, ok, bad = loaded.batch, loaded.paths, loaded.failures
    if not ok:
        raise DataError("none of the ranges file's calibration slices could be read")
    return CalibrationSet(files[0].parent, [], images, bad)


def _residual(ranges: RangesFile | None, chosen: str | None) -> tuple[RangesFile | None, str]:
    """``ranges`` with the residual form ``chosen`` (None: its own), and a note when that is
    not the form its QAT detector was fine-tuned with."""
    if ranges is None or chosen is None:
        return ranges, ""
    trained = residual_form(ranges)
    note = ""
    if ranges.options.get("qat") and chosen != trained:
        note = (f"the QAT detector was fine-tuned with its residual paths reading {trained}; this graph reads them "
                f"{chosen}, so it is not the model the fine-tune trained")
    return replace(ranges, options={**ranges.options, "residual": chosen}), note


def export_reduced(checkpoint: str | Path, out: str | Path, opts: ReducedOptions, opset: int = OPSET,
                   on_step: Callable[[str], None] | None = None) -> tuple[ExportResult, dict]:
    """Export an FP16 or INT8 graph (module docstring); return the result and a summary.

    The summary holds the islands and their reasons, the sensitivity measurement (if one
    ran), whether calibration ran, the files written beside the graph, and the graph's
    FP16 weight share or Q/DQ facts.

    Raises:
        ConfigError: inconsistent options (INT8 without calibration data ...).
        DataError: unreadable calibration slices, a ranges file or report for another graph.
        CheckpointError, ExportError: as :func:`ctmask.exporter.onnx_export.export_onnx`.
    """
    opts.check()
    t0 = time.perf_counter()
    out = Path(out)
    _check_before_trace(out, opts)
    if on_step:
        on_step("tracing the FP32 graph")
    proto32, spec32 = trace_checked(checkpoint, opset)
    sha = proto_sha256(proto32)
    ranges, calibrated, cal = (None, False, None)
    if opts.precision == "int8":
        ranges, calibrated, cal = _ranges_for(proto32, spec32, sha, opts, on_step)
    ranges, residual_note = _residual(ranges, opts.residual)
    reduce = reducer(opts.precision, ranges, opts.int8_target)
    islands, report = _choose_islands(proto32, spec32, sha, opts, ranges, cal, on_step)
    reduced_proto = reduce(proto32, set(islands) | set(ALWAYS_FP32))
    spec = replace(spec32, precision=opts.precision, fp32_islands=tuple(sorted(islands)),
                   int8_target=opts.int8_target if opts.precision == "int8" else "", source_sha256=sha)
    extra = {"ctmask.fp32_islands": json.dumps(islands, sort_keys=True),
             "ctmask.reduced_blocks": json.dumps(sorted(set(BLOCKS) - set(islands)))}
    if ranges is not None:
        extra["ctmask.calibration"] = json.dumps({"method": ranges.method, "slices": len(ranges.slices),
                                                  "source_sha256": ranges.graph_sha256,
                                                  "residual": residual_form(ranges)})
    set_metadata(reduced_proto, spec, extra)
    verify_graph(reduced_proto, spec, out)
    written: dict[str, str] = {}
    try:
        # Sidecars first (they describe the graph); the graph last, so a failure leaves no graph.
        if calibrated and ranges is not None:
            written["ranges"] = str(ranges.save(sidecar(out, "ranges")))
        if report is not None and opts.islands_report is None:
            path = sidecar(out, "precision")
            write_json_atomic(path, report)
            written["precision_report"] = str(path)
        result = write_graph(reduced_proto, spec, out, t0)
    except OSError as exc:
        for path in written.values():
            Path(path).unlink(missing_ok=True)
        raise DataError(f"cannot write the output ({exc.__class__.__name__}: {exc.strerror or exc})", out) from None
    written = {"graph": str(out), **written}
    notes = [residual_note] if residual_note else []
    if not set(BLOCKS) - set(islands) and opts.fp32_blocks is None:
        notes.append(f"no block can run in {opts.precision} without changing more class calls than parity allows, so "
                     "this graph computes in FP32 throughout; --fp32-blocks forces blocks into reduced precision "
                     "(parity then shows what that costs)")
    summary = {"precision": opts.precision, "fp32_islands": islands, "notes": notes,
               "reduced_blocks": sorted(set(BLOCKS) - set(islands)), "calibrated": calibrated,
               "calibration": None if ranges is None else {"method": ranges.method, "slices": len(ranges.slices),
                                                             "from": "calibrated now" if calibrated
                                                             else str(opts.calibration)},
               "sensitivity": None if report is None else report["choice"], "files": written}
    if opts.precision == "fp16":
        half, single = fp16_initializers(reduced_proto)
        summary["weights"] = {"float16": half, "float32": single}
    else:
        summary["int8_target"] = opts.int8_target
        summary["qdq"] = qdq_summary(reduced_proto)
        summary["residual"] = residual_form(ranges)
    return result, summary


def _choose_islands(proto32: onnx.ModelProto, spec32: GraphSpec, sha: str, opts: ReducedOptions,
                    ranges: RangesFile | None, cal, on_step: Callable[[str], None] | None) -> tuple[dict, dict | None]:
    """The blocks kept in FP32 (block -> why) and the sensitivity report behind them (None
    when ``--fp32-blocks`` chose them): given, read from a report, or measured now."""
    report = None
    if opts.fp32_blocks is not None:
        islands = {b: "chosen by --fp32-blocks (not measured)" for b in opts.fp32_blocks}
        islands.update(ALWAYS_FP32)
    elif opts.islands_report is not None:
        report = load_report(opts.islands_report, opts.precision, sha, opts.int8_target, ranges)
        islands = {**report["choice"]["fp32_islands"], **ALWAYS_FP32}
    else:
        report = _measure(proto32, spec32, sha, opts, ranges, cal, on_step)
        islands = dict(report["choice"]["fp32_islands"])
    return islands, report


def _measure(proto32: onnx.ModelProto, spec32: GraphSpec, sha: str, opts: ReducedOptions,
             ranges: RangesFile | None, cal, on_step: Callable[[str], None] | None, nodes: bool = False) -> dict:
    measured = _measurement_images(spec32, opts, ranges, cal)
    reduce = reducer(opts.precision, ranges, opts.int8_target)
    # The combination may change the share of calls parity allows (0.5% FP16, 1% INT8).
    choice = choose_islands(proto32, measured.images, opts.precision, reduce,
                            1.0 - PARITY_AGREEMENT[opts.precision], on_step,
                            parity_tolerances(opts.precision)["s.logits"].atol,
                            node_reducer(opts.precision, ranges, opts.int8_target) if nodes else None)
    return precision_report(choice, sha, spec32, opts, ranges)


def measure_precision(checkpoint: str | Path, opts: ReducedOptions, out: str | Path | None = None,
                      opset: int = OPSET, on_step: Callable[[str], None] | None = None, nodes: bool = False) -> dict:
    """``ctmask precision-report``: the per-block sensitivity of a checkpoint's graph.

    Calibrates first for INT8 when ``opts.calibration`` is slices (the ranges are not
    saved: ``ctmask calibrate`` makes a ranges file). With ``nodes``, also every
    Conv / Gemm / MatMul of the candidate blocks alone. Writes the report to ``out`` if given.
    """
    opts = replace(opts, islands_report=None, fp32_blocks=None)
    opts.check()
    _check_ranges_early(opts)
    if on_step:
        on_step("tracing the FP32 graph")
    proto32, spec32 = trace_checked(checkpoint, opset)
    sha = proto_sha256(proto32)
    ranges, cal = None, None
    if opts.precision == "int8":
        ranges, _, cal = _ranges_for(proto32, spec32, sha, opts, on_step)
        ranges, _ = _residual(ranges, opts.residual)
    report = _measure(proto32, spec32, sha, opts, ranges, cal, on_step, nodes)
    if out is not None:
        write_json_atomic(out, report)
    return report


def precision_report(choice: IslandChoice, source_sha256: str, spec: GraphSpec, opts: ReducedOptions,
                     ranges: RangesFile | None) -> dict:
    """The JSON report of a sensitivity measurement (reusable with ``--islands``)."""
    return {"format": REPORT_FORMAT, "source_sha256": source_sha256, "preset": spec.preset,
            "checkpoint": spec.checkpoint_name, "weights_sha256": spec.weights_sha256,
            "int8_target": opts.int8_target if opts.precision == "int8" else None,
            "calibration": None if ranges is None else {"method": ranges.method, "slices": len(ranges.slices),
                                                         "ranges_sha256": ranges.content_sha256(),
                                                         "residual": residual_form(ranges)},
            "measured_against": "the FP32 graph in onnxruntime (proven against PyTorch by `ctmask parity`)",
            "choice": choice.to_dict()}
