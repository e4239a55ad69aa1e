"""Quantization-aware fine-tuning of the detector, matching ``export --precision int8``.

The INT8 graph (:func:`ctmask.exporter.precision.quantize_int8`) puts Q/DQ pairs on every
Conv / Gemm of the detector blocks: weights int8, symmetric, per output channel (the scale
from each channel's max |w| of the BatchNorm-folded weights); activations per tensor, on
the inputs and the outputs of those nodes, with scales from a ranges file. This module
reproduces that with NVIDIA ModelOpt's PyTorch quantization (``modelopt.torch.quantization``):

- weights: ModelOpt ``weight_quantizer`` (8 bits, axis 0) without a stored amax, so the
  scale is each output channel's max |w| of the current weights, as onnxruntime computes it.
  Per-channel symmetric quantization commutes with BatchNorm's per-channel scale, so
  quantizing the unfolded convolution weight equals quantizing the folded one (BatchNorm
  is frozen in eval mode during the fine-tune, as the graph folds its running statistics);
- activations: ModelOpt ``input_quantizer`` / ``output_quantizer`` (8 bits, per tensor,
  signed symmetric: TensorRT's int8 form), one per quantized graph tensor. A backbone
  convolution's output is its BatchNorm's output in the graph, so that quantizer is the
  BatchNorm's ``output_quantizer``. Their amax comes from a ranges file of the FP32 graph
  (``ctmask calibrate``), mapped onto modules through each node's weight name; the RPN head
  runs once per FPN level on shared weights, so its quantizers take the largest of the
  levels' ranges (and the ranges written back give every level that one range).

Training: the five Mask R-CNN losses of the fake-quantized detector plus, optionally, a
distillation term (the fake-quantized RPN and box-predictor outputs against the detector as
it was before, frozen FP32), so the INT8 graph learns to agree with the FP32 model. The
saved checkpoint is a plain segmentation checkpoint (fake-quant removed, FP32 weights); the
activation amax values go into its config (``config["qat"]``), from which :func:`qat_ranges`
writes the ranges file of the exported graph.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ctmask.calibration.ranges import RESIDUAL_FORMS, RangesFile
from ctmask.core.errors import ConfigError, RangesError

GRAPH_MODULES = {
    # prefix of a weight name in the exported graph -> module path in the detector
    "model.ranker.backbone.": "backbone.",
    "model.ranker.rpn_head.": "rpn.head.",
    "model.ranker.box_head.": "roi_heads.box_head.",
    "model.ranker.box_predictor.": "roi_heads.box_predictor.",
}
"""The detector blocks the INT8 graph quantizes (backbone body and FPN, RPN head, box head,
box predictor); the mask head is not in the graph."""

QUANT_OPS = ("Conv", "Gemm")


def module_of_weight(weight: str) -> str | None:
    """Detector module path of a graph weight name, or None outside :data:`GRAPH_MODULES`."""
    if not weight.endswith(".weight"):
        return None
    for prefix, path in GRAPH_MODULES.items():
        if weight.startswith(prefix):
            return path + weight[len(prefix):-len(".weight")]
    return None


def output_owner(module: str) -> str:
    """The module whose output is ``module``'s output in the graph (its BatchNorm, folded there)."""
    if not module.startswith("backbone.body."):
        return module
    head, _, last = module.rpartition(".")
    if last == "0" and head.endswith("downsample"):
        return head + ".1"
    if last.startswith("conv"):
        return f"{head}.bn{last[4:]}"
    return module


def graph_quantizers(proto: onnx.ModelProto) -> dict[str, set[str]]:
    """Graph tensor -> the ModelOpt quantizer names (``<module>.input_quantizer`` ...) that
    model it, for every activation the INT8 graph quantizes in the detector blocks.

    A tensor that is the output of a quantized node keeps only that output quantizer (a
    reader's input quantizer would quantize it twice).
    """
    inits = {t.name for t in proto.graph.initializer}
    by_tensor: dict[str, set[str]] = {}
    outputs: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type not in QUANT_OPS or len(node.input) < 2:
            continue
        module = module_of_weight(node.input[1])
        if module is None:
            continue
        if node.input[0] not in inits:
            by_tensor.setdefault(node.input[0], set()).add(f"{module}.input_quantizer")
        outputs[node.output[0]] = f"{output_owner(module)}.output_quantizer"
    for tensor, q in outputs.items():
        by_tensor[tensor] = {q}
    return by_tensor


def amax_from_ranges(proto: onnx.ModelProto, ranges: RangesFile) -> dict[str, float]:
    """Quantizer name -> amax (max |range| over the tensors it models) from a ranges file of ``proto``."""
    out: dict[str, float] = {}
    missing = []
    for tensor, quantizers in graph_quantizers(proto).items():
        if tensor not in ranges.ranges:
            missing.append(tensor)
            continue
        lo, hi = ranges.ranges[tensor]
        for q in quantizers:
            out[q] = max(out.get(q, 0.0), abs(lo), abs(hi))
    if missing:
        raise RangesError(f"the ranges do not cover {len(missing)} detector tensor(s) the INT8 graph quantizes "
                          f"(e.g. {missing[0]!r})", hint="calibrate this graph (`ctmask calibrate`)")
    return out


def qat_ranges(proto: onnx.ModelProto, amax: dict[str, float], base: RangesFile,
               base_path: str | Path = "the base ranges", graph_name: str = "this graph",
               residual: str = "float") -> RangesFile:
    """The ranges file of ``proto`` (an export of a QAT checkpoint) with the fine-tune's scales.

    Every detector tensor the INT8 graph quantizes gets ``[-amax, amax]`` of its quantizer
    (the range the fine-tune trained with); other tensors keep ``base``'s ranges (a
    calibration of the same graph). ``residual``, the fine-tune's residual form
    (:data:`~ctmask.calibration.ranges.RESIDUAL_FORMS`), goes into the options, and
    ``export --precision int8`` writes it.

    Raises:
        RangesError: ``base`` (read from ``base_path``) was measured on another graph than
            ``graph_name``, or a quantizer has no amax.
    """
    from ctmask.core.graphs import content_sha256

    if residual not in RESIDUAL_FORMS:
        raise RangesError(f"unknown residual form {residual!r}; expected one of {', '.join(RESIDUAL_FORMS)}")
    base.check_graph(content_sha256(proto), base_path, graph_name)
    ranges = dict(base.ranges)
    for tensor, quantizers in graph_quantizers(proto).items():
        missing = [q for q in quantizers if q not in amax]
        if missing:
            raise RangesError(f"the QAT checkpoint has no amax for {missing[0]!r} (tensor {tensor!r})")
        a = max(amax[q] for q in quantizers)
        ranges[tensor] = (-a, a)
    return RangesFile(method=base.method, graph_sha256=base.graph_sha256, ranges=ranges, slices=base.slices,
                      options={**base.options, "qat": True, "residual": residual}, graph=base.graph)


# --- ModelOpt wrapping ---------------------------------------------------------------


def quant_config() -> dict:
    """ModelOpt config: 8-bit per-channel weights, 8-bit per-tensor inputs / outputs, no calibration."""
    # pass_through_bwd=False: the gradient is zero where a value was clipped to +-amax (the
    # usual QAT estimator). ModelOpt's default passes it through, and then a loss can push an
    # activation past its fixed range without limit (measured: the distillation term grew
    # from 0.25 to 1e22 in 300 steps as the unquantized activations ran away).
    int8_tensor = {"num_bits": 8, "axis": None, "pass_through_bwd": False}
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0, "pass_through_bwd": False}},
            {"quantizer_name": "*input_quantizer", "cfg": int8_tensor},
            {"quantizer_name": "*output_quantizer", "cfg": int8_tensor},
        ],
        "algorithm": None,
    }


def quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ModelOpt ``TensorQuantizer`` of ``model`` by name."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def wrap_detector(detector: nn.Module, amax: dict[str, float], weights: set[str] | None = None,
                  residual: str = "float") -> list[str]:
    """Insert ModelOpt fake-quantization into ``detector`` (in place); return the enabled quantizers.

    Enabled: the weight quantizer of every Conv2d / Linear of the graph's detector blocks
    (dynamic per-channel max |w|; with ``weights``, only of those modules), and the activation
    quantizers named in ``amax`` with those fixed amax values. Everything else (the mask head,
    BatchNorm inputs ...) is off. ``residual`` (one of
    :data:`~ctmask.calibration.ranges.RESIDUAL_FORMS`): what the residual and top-down paths
    read (``int8``: :func:`quantize_shared_reads`).

    Raises:
        ConfigError: ModelOpt is not installed, an amax names no quantizer of the detector, or
            an unknown ``residual``.
    """
    if residual not in RESIDUAL_FORMS:
        raise ConfigError(f"unknown residual form {residual!r}; expected one of {', '.join(RESIDUAL_FORMS)}")
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise ConfigError(f"QAT needs NVIDIA ModelOpt (pip install 'ctmask[qat]'): {exc}") from None
    mtq.quantize(detector, quant_config(), forward_loop=None)
    qs = quantizers(detector)
    unknown = sorted(set(amax) - set(qs))
    if unknown:
        raise ConfigError(f"no quantizer {unknown[0]!r} in the detector ({len(unknown)} unknown)")
    graph_modules = tuple(GRAPH_MODULES.values())
    enabled = []
    for name, q in qs.items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight_quantizer") and module.startswith(graph_modules) \
                and (weights is None or module in weights):
            q.reset_amax()  # dynamic: each forward's per-channel max |w|, as onnxruntime
            q.enable()
            enabled.append(name)
        elif name in amax:
            q.amax = torch.tensor(float(amax[name]))
            q.enable()
            enabled.append(name)
        else:
            q.disable()
    if residual == "int8":
        quantize_shared_reads(detector)
    return sorted(enabled)


def quantize_shared_reads(detector: nn.Module) -> list[str]:
    """Make ``detector`` (wrapped by ModelOpt) read its shared activations as the ``int8``
    residual form has them; return the blocks changed.

    - a ResNet block without a downsample adds its input to its output: a forward pre-hook
      hands the block its input through ``conv1``'s input quantizer, so the identity path reads
      what ``conv1`` reads (``conv1`` quantizes it again: on the same grid that changes nothing);
    - the FPN's top-down path upsamples each level's sum as that level's layer-block
      convolution reads it (:func:`_fpn_forward_int8`).

    A disabled quantizer passes its input through, so a block whose convolution is not
    quantized keeps reading float.
    """
    import types

    from torchvision.models.resnet import BasicBlock, Bottleneck

    changed = []
    for name, module in detector.backbone.body.named_modules():
        if isinstance(module, (BasicBlock, Bottleneck)) and module.downsample is None:
            module.register_forward_pre_hook(_identity_as_conv1_reads)
            changed.append(f"backbone.body.{name}")
    fpn = detector.backbone.fpn
    if len(fpn.layer_blocks) > 1:
        fpn.forward = types.MethodType(_fpn_forward_int8, fpn)
        changed.append("backbone.fpn")
    return changed


def _identity_as_conv1_reads(block: nn.Module, args: tuple) -> tuple:
    return (block.conv1.input_quantizer(args[0]), *args[1:])


def _fpn_forward_int8(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's ``FeaturePyramidNetwork.forward`` (0.2x) with one change: the top-down
    upsampling reads the level's sum through the input quantizer of the layer-block
    convolution that reads the same sum (nearest upsampling copies values, so this equals
    quantizing the upsampled map)."""
    from collections import OrderedDict

    names = list(x.keys())
    feats = list(x.values())
    last_inner = self.get_result_from_inner_blocks(feats[-1], -1)
    results = [self.get_result_from_layer_blocks(last_inner, -1)]
    for idx in range(len(feats) - 2, -1, -1):
        inner_lateral = self.get_result_from_inner_blocks(feats[idx], idx)
        shared = self.layer_blocks[idx + 1][0].input_quantizer(last_inner)
        inner_top_down = nn.functional.interpolate(shared, size=inner_lateral.shape[-2:], mode="nearest")
        last_inner = inner_lateral + inner_top_down
        results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
    if self.extra_blocks is not None:
        results, names = self.extra_blocks(results, feats, names)
    return OrderedDict(zip(names, results))


@contextlib.contextmanager
def quantization_off(model: nn.Module, names: list[str]):
    """Run ``model`` without the fake-quantization of ``names`` (the FP32 model of the same weights)."""
    qs = quantizers(model)
    for n in names:
        qs[n].disable()
    try:
        yield
    finally:
        for n in names:
            qs[n].enable()


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict without ModelOpt's quantizer entries (a normal detector state)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "_quantizer" not in k}


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers in eval mode: running statistics fixed, as the graph folds them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# --- fine-tuning -----------------------------------------------------------------------


@dataclass(frozen=True)
class QatOptions:
    """Options of :func:`train_qat` (stored in the checkpoint config).

    Raises:
        ConfigError: steps or batch size < 1, lr <= 0, weight decay or distill < 0, an unknown
            residual form (:data:`~ctmask.calibration.ranges.RESIDUAL_FORMS`).
    """

    steps: int = 300
    batch_size: int = 4
    lr: float = 2e-5
    weight_decay: float = 0.0
    distill: float = 1.0
    hflip: bool = True
    seed: int = 0
    residual: str = "float"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("QAT steps and batch size must be >= 1")
        if self.residual not in RESIDUAL_FORMS:
            raise ConfigError(f"unknown --residual {self.residual!r}; expected one of {', '.join(RESIDUAL_FORMS)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.distill < 0:
            raise ConfigError("QAT needs lr > 0, weight decay >= 0 and distill >= 0")


class _Capture:
    """Forward hooks keeping the last outputs (and box-pool inputs) of the detector's heads."""

    def __init__(self, detector: nn.Module):
        self.rpn = self.box = self.pool_args = None
        self.handles = [
            detector.rpn.head.register_forward_hook(lambda m, a, o: setattr(self, "rpn", o)),
            detector.roi_heads.box_predictor.register_forward_hook(lambda m, a, o: setattr(self, "box", o)),
            detector.roi_heads.box_roi_pool.register_forward_hook(lambda m, a, o: setattr(self, "pool_args", a)),
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def distill_loss(teacher: nn.Module, x: torch.Tensor, cap: _Capture) -> torch.Tensor:
    """Mean squared difference between the fake-quantized outputs just captured in ``cap``
    (RPN objectness and deltas of every level; class logits and box deltas of the sampled
    proposals) and those of ``teacher``, the detector as it was before the fine-tune (FP32,
    frozen, no gradient).

    The teacher is not the fine-tuned weights without quantization: under the straight-through
    estimator the gradient of that gap is about zero (quantization counts as identity), so Adam
    only amplified its noise (measured: the gap grew from 0.25 to 1.0-1.5 in 14 steps, while it
    stayed at 0.25-0.6 without the term)."""
    obj_q, deltas_q = cap.rpn
    cls_q, reg_q = cap.box
    _, proposals, image_shapes = cap.pool_args
    with torch.no_grad():
        features = teacher.backbone(x)
        obj_f, deltas_f = teacher.rpn.head(list(features.values()))
        pooled = teacher.roi_heads.box_roi_pool(features, [p.detach() for p in proposals], image_shapes)
        cls_f, reg_f = teacher.roi_heads.box_predictor(teacher.roi_heads.box_head(pooled))
    terms = [nn.functional.mse_loss(a, b) for a, b in zip(obj_q, obj_f)]
    terms += [nn.functional.mse_loss(a, b) for a, b in zip(deltas_q, deltas_f)]
    return sum(terms) / len(obj_q) + nn.functional.mse_loss(cls_q, cls_f) + nn.functional.mse_loss(reg_q, reg_f)


def _fine_tune(detector: nn.Module, teacher: nn.Module | None, loader, optimizer: torch.optim.Optimizer,
               opts: QatOptions, show_progress: bool) -> list[dict]:
    """``opts.steps`` optimizer steps of the detection losses (plus ``opts.distill`` times the
    distillation loss against ``teacher``), BatchNorm frozen; the losses of every step."""
    from ctmask.core.progress import progress
    from ctmask.training.detector import detector_losses, normalize

    detector.train()
    freeze_batchnorm(detector)
    cap = _Capture(detector)
    history: list[dict] = []
    with progress(opts.steps, "qat", show_progress) as advance:
        while len(history) < opts.steps:
            for images, targets in loader:
                losses = detector_losses(detector, images, targets)
                if teacher is not None and opts.distill > 0:
                    losses["loss_distill"] = opts.distill * distill_loss(teacher, normalize(images), cap)
                total = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                history.append({k: float(v.detach()) for k, v in losses.items()})
                advance(status=f"loss {float(total.detach()):.3f}")
                if len(history) >= opts.steps:
                    break
    cap.close()
    return history


def train_qat(
    checkpoint: str | Path,
    samples: list,
    graph: str | Path,
    ranges: str | Path,
    out: str | Path,
    opts: QatOptions,
    show_progress: bool = True,
) -> dict:
    """Fine-tune a segmentation checkpoint with fake-quantization; save it without.

    Args:
        checkpoint: segmentation checkpoint (the FP32 detector).
        samples: training slices (CNCB layout, :func:`ctmask.data.cncb.list_segmentation`).
        graph: an FP32 graph exported from a classifier on this detector (ctmask export).
        ranges: its ranges file (``ctmask calibrate``): the initial activation scales.
        out: segmentation checkpoint to write (FP32 weights; ``config["qat"]``: the activation
            amax of every quantizer, the residual form, the options and the loss history).
        opts: steps, batch size, Adam settings, distillation weight, augmentation, seed.

    Returns:
        Summary: steps, quantizers, mean losses of the first and last 50 steps, seconds.
    """
    from torch.utils.data import DataLoader

    from ctmask.calibration.ranges import load_ranges
    from ctmask.core.graphs import content_sha256, load_proto
    from ctmask.core.progress import console
    from ctmask.training.checkpoint import load_checkpoint, save_checkpoint
    from ctmask.training.datasets import SegmentationDataset, collate_detection
    from ctmask.training.detector import build_detector
    from ctmask.training.model import load_state
    from ctmask.training.reproducibility import environment, seed_everything

    seed_everything(opts.seed)
    ck = load_checkpoint(checkpoint, kind="segmentation")
    proto = load_proto(graph)
    rf = load_ranges(ranges)
    rf.check_graph(content_sha256(proto), ranges, str(graph))
    amax = amax_from_ranges(proto, rf)

    detector = build_detector(ck.preset)
    load_state(detector, ck.model, ck.path)
    teacher = None
    if opts.distill > 0:
        teacher = build_detector(ck.preset)
        load_state(teacher, ck.model, ck.path)
        teacher.eval().requires_grad_(False)
    enabled = wrap_detector(detector, amax, residual=opts.residual)
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    data = SegmentationDataset(samples, ck.preset.image_size, hflip=opts.hflip, mask_type=ck.preset.mask_type)
    gen = torch.Generator().manual_seed(opts.seed)
    loader = DataLoader(data, batch_size=opts.batch_size, shuffle=True, collate_fn=collate_detection, generator=gen)
    t0 = time.perf_counter()
    history = _fine_tune(detector, teacher, loader, optimizer, opts, show_progress)
    seconds = time.perf_counter() - t0

    def mean(rows: list[dict]) -> dict:
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}

    first, last = mean(history[:50]), mean(history[-50:])
    if show_progress:
        console.print("qat: first 50 steps " + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
        console.print("qat: last 50 steps  " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    qs = quantizers(detector)
    learned = {n: float(qs[n].amax) for n in enabled if not n.endswith(".weight_quantizer")}
    state = plain_state(detector)
    save_checkpoint(
        out, kind="segmentation", preset=ck.preset, model=state, epoch=ck.epoch,
        config={**{k: v for k, v in ck.config.items() if k not in ("qat",)},
                "qat": {"from": str(checkpoint), "graph": str(graph), "ranges": str(ranges),
                        "ranges_method": rf.method, "options": asdict(opts), "tool": _tool(),
                        "quantizers": enabled, "amax": learned, "residual": opts.residual, "first_losses": first,
                        "last_losses": last, "seconds": seconds},
                "environment": environment()},
    )
    return {"steps": len(history), "quantizers": len(enabled), "weight_quantizers": sum(n.endswith("weight_quantizer")
                                                                               for n in enabled),
            "first": first, "last": last, "seconds": seconds, "n_train": len(samples), "history": history}


def _tool() -> str:
    import modelopt

    return f"nvidia-modelopt {modelopt.__version__}"
