"""The classifier heads: the pooled head's continuity, its training, export and records; the
RoI cache; the noise floor in evaluate and parity."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from ctmask.core.errors import ConfigError, CtmaskWarning, ModelError
from ctmask.core.noise import NoiseFloor, add_gray_noise, describe_noise_floor
from ctmask.core.presets import SMALL, preset_from_dict
from ctmask.core.spec import GraphSpec
from ctmask.data.covidx import read_split
from ctmask.training.checkpoint import load_checkpoint
from ctmask.training.heads import PooledRoIHead, RoIClassifier, build_head
from ctmask.training.train_cls import ClsTrainOptions, train_classifier


def ranked(batch: int = 4, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Plausible ranked rows: descending scores in (0, 1), deltas of a few units."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(batch, n, 5, generator=g)
    rows[..., 0] = torch.rand(batch, n, generator=g).sort(-1, descending=True).values
    return rows


@pytest.fixture(scope="module")
def heads():
    torch.manual_seed(0)
    return {"paper": RoIClassifier(64, 256).eval(), "pooled": PooledRoIHead(64, 256).eval()}


def test_pooled_head_ignores_row_order(heads):
    rows = ranked()
    perm = torch.randperm(64)
    with torch.no_grad():
        d = (heads["pooled"](rows) - heads["pooled"](rows[:, perm])).abs().max()
    assert d < 1e-5


def test_near_tie_swap_moves_the_paper_head_but_not_the_pooled_head(heads):
    rows = ranked()
    rows[:, 3, 0] = rows[:, 4, 0] + 1e-6  # rows 3 and 4 near-tied, deltas differ by units
    swapped = rows.clone()
    swapped[:, [3, 4]] = rows[:, [4, 3]]
    with torch.no_grad():
        paper = (heads["paper"](rows) - heads["paper"](swapped)).abs().max()
        pooled = (heads["pooled"](rows) - heads["pooled"](swapped)).abs().max()
    assert pooled < 1e-4 and paper > 100 * max(float(pooled), 1e-6)


def test_a_row_at_the_cut_has_no_influence_on_the_pooled_head(heads):
    rows = ranked()
    other = rows.clone()
    other[:, -1, 1:] = torch.tensor([9.0, -9.0, 5.0, -5.0])  # the N-th row replaced by another candidate
    with torch.no_grad():
        d = (heads["pooled"](rows) - heads["pooled"](other)).abs().max()
    assert d < 1e-5


def test_pooled_logits_move_about_as_much_as_the_scores(heads):
    rows = ranked()
    eps = 1e-4
    moved = rows.clone()
    moved[..., 0] += eps * torch.rand_like(moved[..., 0])
    with torch.no_grad():
        d = (heads["pooled"](rows) - heads["pooled"](moved)).abs().max()
    assert d < 1e3 * eps


def test_padding_rows_count_nothing_and_a_fully_padded_list_is_finite(heads):
    rows = ranked()
    rows[:, 40:, 0] = 0.0  # a short list: zero scores past row 40 ...
    other = rows.clone()
    other[:, 40:, 1:] = 0.0  # ... whatever their deltas
    with torch.no_grad():
        d = (heads["pooled"](rows) - heads["pooled"](other)).abs().max()
        empty = heads["pooled"](torch.zeros(2, 64, 5))
    assert d < 1e-5 and torch.isfinite(empty).all()


@pytest.mark.parametrize("name", ["paper", "pooled"])
def test_build_head_by_name_and_unknown_names_are_refused(name):
    from ctmask.core.presets import HEAD_NAMES
    from ctmask.training.heads import HEADS

    assert set(HEADS) == set(HEAD_NAMES)  # every head named in the contract is described and built
    assert isinstance(build_head(name, 64, 256), RoIClassifier if name == "paper" else PooledRoIHead)
    with pytest.raises(ConfigError, match="unknown classifier head"):
        build_head("mlp", 64, 256)
    with pytest.raises(ConfigError, match="unknown classifier head"):
        dataclasses.replace(SMALL, head="mlp")


def test_old_preset_dicts_hold_the_papers_head():
    d = SMALL.to_dict()
    d.pop("head")
    assert preset_from_dict(d).head == "paper"


def test_model_info_counts_both_heads():
    from ctmask.core.presets import PAPER
    from ctmask.training.model import parameter_report

    r = parameter_report(PAPER)
    assert r["head"] == "paper" and r["classifier_s"] == r["heads"]["paper"]["parameters"] == 2_364_419
    assert r["heads"]["pooled"]["parameters"] < r["heads"]["paper"]["parameters"] / 10


@pytest.fixture(scope="module")
def pooled_run(seg_ckpt, synth_dir, tmp_path_factory):
    """A pooled-head classifier trained through the RoI cache, and the cache folder."""
    out = tmp_path_factory.mktemp("pooled")
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    val = read_split(synth_dir / "val_COVIDx_CT.txt")
    opts = ClsTrainOptions("heads", epochs=2, batch_size=4, lr=1e-3, head="pooled")
    train_classifier(SMALL, seg_ckpt, train, val, out / "cls.pt", opts, False, roi_cache=out / "cache")
    return out


@pytest.fixture(scope="module")
def pooled_graph(pooled_run):
    """The pooled classifier exported to ONNX once for the module."""
    from ctmask.exporter.onnx_export import export_onnx

    out = pooled_run / "p.onnx"
    export_onnx(pooled_run / "cls.pt", out)
    return out


def test_pooled_head_is_recorded_in_checkpoint_and_graph(pooled_run, pooled_graph):
    from ctmask.core.spec import GraphSpec
    from ctmask.runtime.runner import OnnxRuntimeRunner

    ck = load_checkpoint(pooled_run / "cls.pt", kind="classifier")
    assert ck.preset.head == "pooled" and ck.config["train"]["head"] == "pooled"
    assert any(k.startswith("classifier.row.") for k in ck.model)
    meta = {p.key: p.value for p in onnx.load(str(pooled_graph)).metadata_props}
    assert meta["ctmask.head"] == "pooled" and GraphSpec.from_metadata(meta, pooled_graph).head == "pooled"
    with OnnxRuntimeRunner(pooled_graph) as r:
        out = r.infer({"images": np.zeros((2, 1, 192, 192), np.float32)})
    assert {k: v.shape for k, v in out.items()} == {"rois": (2, 64, 5), "logits": (2, 3), "probs": (2, 3),
                                                      "boxes": (2, 64, 4), "labels": (2, 64)}


def test_pooled_graph_passes_parity_and_reports_its_noise_floor(pooled_run, pooled_graph, synth_dir):
    from ctmask.backends.parity import check_parity
    from ctmask.cli.deploy import format_parity

    report = check_parity(pooled_run / "cls.pt", pooled_graph, [synth_dir / "images"], max_images=6,
                          batch_size=3)
    assert report["passed"], format_parity(report)
    floor = report["noise_floor"]
    assert floor["n"] == 6 and [lv["gray_levels"] for lv in floor["levels"]] == [0.25, 1.0]
    assert "noise floor:" in format_parity(report) and "head pooled" in format_parity(report)


def test_a_failing_reduced_paper_graph_names_the_noise_floor_and_the_stable_head():
    from ctmask.cli.deploy import noise_floor_advice

    floor = {"n": 625, "levels": [{"gray_levels": 0.25, "changed_calls": 18}, {"gray_levels": 1.0,
                                                                               "changed_calls": 26}]}
    lost = {"precision": "int8", "n_images": 625, "argmax_agreement": 1 - 18 / 625, "noise_floor": floor}
    text = noise_floor_advice({**lost, "head": "paper"})
    assert "18 of 625" in text and "--head pooled" in text and "loses 18" in text
    pooled = noise_floor_advice({**lost, "head": "pooled"})
    assert "--head pooled" not in pooled and "as many as this graph loses (18)" in pooled
    # A stable model that loses more calls than its noise floor: the precision's own loss, said so.
    stable = {**lost, "head": "pooled", "argmax_agreement": 1 - 7 / 625,
              "noise_floor": {"n": 625, "levels": [{"gray_levels": 0.25, "changed_calls": 0}]}}
    text = noise_floor_advice(stable)
    assert "fewer than the 7 this graph loses" in text and "cannot survive" not in text


def test_roi_cache_is_reused_keyed_and_recomputed_when_damaged(pooled_run, seg_ckpt, synth_dir, monkeypatch):
    import ctmask.training.train_cls as tc

    files = sorted((pooled_run / "cache").glob("rois-*.pt"))
    assert len(files) == 2  # training and validation slices
    calls = []
    real = tc.ranked_rois_of
    monkeypatch.setattr(tc, "ranked_rois_of", lambda *a, **k: calls.append(1) or real(*a, **k))
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    opts = ClsTrainOptions("heads", epochs=1, batch_size=4, lr=1e-3, head="paper", seed=5)
    out = pooled_run / "again.pt"
    train_classifier(SMALL, seg_ckpt, train, None, out, opts, False, roi_cache=pooled_run / "cache")
    assert calls == []  # another head and seed: the detector did not run again
    # Other slices are another key; a damaged file is recomputed with a warning.
    files[0].write_bytes(b"not a tensor file")
    files[1].write_bytes(b"not a tensor file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_classifier(SMALL, seg_ckpt, train, None, out, dataclasses.replace(opts, epochs=2), False,
                         roi_cache=pooled_run / "cache")
    assert calls == [1] and any(isinstance(w.message, CtmaskWarning) for w in caught)
    train_classifier(SMALL, seg_ckpt, train[:-1], None, pooled_run / "third.pt", opts, False,
                     roi_cache=pooled_run / "cache")
    assert calls == [1, 1]


def test_head_of_a_classifier_init_cannot_be_changed(pooled_run, synth_dir):
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    opts = ClsTrainOptions("heads+bn", epochs=1, batch_size=4, lr=1e-3, head="paper")
    with pytest.raises(ConfigError, match="holds the 'pooled' head"):
        train_classifier(SMALL, pooled_run / "cls.pt", train, None, pooled_run / "x.pt", opts, False)


def test_evaluate_reports_the_noise_floor(pooled_run, synth_dir):
    from ctmask.training.evaluate import evaluate_classifier

    ck = load_checkpoint(pooled_run / "cls.pt")
    test = read_split(synth_dir / "test_COVIDx_CT.txt")
    r = evaluate_classifier(ck, test, batch_size=2, show_progress=False)
    assert r["head"] == "pooled" and r["noise_floor"]["n"] == len(test)
    assert all(0 <= lv["changed_calls"] <= len(test) for lv in r["noise_floor"]["levels"])
    assert "noise_floor" not in evaluate_classifier(ck, test, 2, show_progress=False, noise_levels=())
    cached = evaluate_classifier(ck, test, batch_size=2, show_progress=False, roi_cache=pooled_run / "eval-cache")
    assert len(list((pooled_run / "eval-cache").glob("rois-*.pt"))) == 3  # clean, +-0.25, +-1
    again = evaluate_classifier(ck, test, batch_size=2, show_progress=False, roi_cache=pooled_run / "eval-cache")
    assert cached["predictions"] == again["predictions"] == r["predictions"]
    assert cached["noise_floor"] == r["noise_floor"]


def test_noise_is_seeded_per_slice_whatever_the_batches():
    images = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    whole = add_gray_noise(images, 0.25)
    parts = np.concatenate([add_gray_noise(images[:4], 0.25), add_gray_noise(images[4:], 0.25, start=4)])
    assert np.array_equal(whole, parts) and whole.min() >= 0 and whole.max() <= 1
    assert 0 < np.abs(whole - images).max() <= 0.25 / 255 + 1e-7
    floor = NoiseFloor((0.25,))
    floor.add(np.array([[1.0, 0, 0], [0, 1, 0]]), {0.25: np.array([[1.0, 0, 0], [2, 1, 0]])})
    assert floor.to_dict()["levels"][0]["changed_calls"] == 1
    assert "1 of 2 calls change" in describe_noise_floor(floor.to_dict())


def test_graph_metadata_names_its_head_and_refuses_unknown_ones():
    spec = GraphSpec.for_preset(dataclasses.replace(SMALL, head="pooled"))
    meta = spec.metadata()
    assert meta["ctmask.head"] == "pooled" and GraphSpec.from_metadata(meta, "g.onnx").head == "pooled"
    old = {k: v for k, v in meta.items() if k != "ctmask.head"}
    assert GraphSpec.from_metadata(old, "g.onnx").head == "paper"
    with pytest.raises(ModelError, match="ctmask.head"):
        GraphSpec.from_metadata({**meta, "ctmask.head": json.dumps("x")}, "g.onnx")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_pooled_head_exports_at_reduced_precision(pooled_run, synth_dir, tmp_path, precision):
    from tests_helpers import invoke

    from ctmask.exporter.precision import node_block
    from ctmask.runtime.runner import OnnxRuntimeRunner

    out = tmp_path / f"p.{precision}.onnx"
    args = ["--calibration", synth_dir, "--calibration-size", 6, "--fp32-blocks", "none"]
    res = invoke("export", pooled_run / "cls.pt", "--out", out, "--precision", precision, *args, "-q")
    assert res.exit_code == 0, res.output
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ctmask.head"] == "pooled" and meta["ctmask.precision"] == precision
    head = [n for n in proto.graph.node if node_block(n) == "classifier" and n.op_type in ("MatMul", "Gemm")]
    assert len(head) >= 4  # the per-row network and the output layers
    if precision == "fp16":
        halves = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
        assert all(set(n.input) & halves for n in head)
    else:
        produced = {o: n.op_type for n in proto.graph.node for o in n.output}
        assert all(produced.get(n.input[0]) == "DequantizeLinear" for n in head)
    with OnnxRuntimeRunner(out) as r:
        got = r.infer({"images": np.random.default_rng(0).random((2, 1, 192, 192), dtype=np.float32)})
    assert np.isfinite(got["logits"]).all() and got["probs"].shape == (2, 3)


def test_evaluate_a_graph_torch_free_with_its_noise_floor(pooled_run, pooled_graph, synth_dir, tmp_path):
    from tests_helpers import invoke

    from ctmask.training.evaluate import evaluate_classifier

    graph = pooled_graph
    test = read_split(synth_dir / "test_COVIDx_CT.txt")
    res = invoke("evaluate", graph, "--split", synth_dir / "test_COVIDx_CT.txt", "--json", tmp_path / "e.json", "-q")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["kind"] == "graph" and r["head"] == "pooled" and r["precision"] == "fp32" and r["n"] == len(test)
    assert [lv["gray_levels"] for lv in r["noise_floor"]["levels"]] == [0.25, 1.0]
    ck = evaluate_classifier(load_checkpoint(pooled_run / "cls.pt"), test, 4, show_progress=False, noise_levels=())
    assert [p["pred"] for p in r["predictions"]] == [p["pred"] for p in ck["predictions"]]
    # A broken slice in the split is skipped with its reason; the others are still evaluated.
    broken = tmp_path / "split.txt"
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = (synth_dir / "test_COVIDx_CT.txt").read_text().splitlines()
    first = lines[0].split()
    broken.write_text("\n".join([" ".join([str(tmp_path / "bad.png"), *first[1:]]), *[
        " ".join([str(synth_dir / "images" / ln.split()[0]), *ln.split()[1:]]) for ln in lines]]) + "\n")
    res = invoke("evaluate", graph, "--split", broken, "--no-noise", "--json", tmp_path / "e2.json", "-q")
    assert res.exit_code == 0, res.output
    r2 = json.loads((tmp_path / "e2.json").read_text())
    assert r2["n"] == len(test) and [s["file"] for s in r2["skipped"]] == [str(tmp_path / "bad.png")]
    assert "Traceback" not in res.output and "bad.png" in res.output
    # A slice listed twice with two labels keeps each line's own label.
    twice = tmp_path / "twice.txt"
    name, *rest = lines[0].split()
    other = str((int(rest[0]) + 1) % 3)
    twice.write_text(f"{synth_dir / 'images' / name} {' '.join(rest)}\n{synth_dir / 'images' / name} "
                     f"{' '.join([other, *rest[1:]])}\n")
    res = invoke("evaluate", graph, "--split", twice, "--no-noise", "--json", tmp_path / "e3.json", "-q")
    assert res.exit_code == 0, res.output
    assert [p["label"] for p in json.loads((tmp_path / "e3.json").read_text())["predictions"]] == [int(rest[0]),
                                                                                                   int(other)]
    res = invoke("evaluate", graph, "--split", broken, "--roi-cache", tmp_path / "c", "-q")
    assert res.exit_code == 2 and "applies to a checkpoint" in res.output


def test_parity_fails_a_graph_whose_head_metadata_lies(pooled_run, pooled_graph, synth_dir, tmp_path):
    from ctmask.backends.parity import check_parity

    liar = tmp_path / "liar.onnx"
    model = onnx.load(str(pooled_graph))
    for p in model.metadata_props:
        if p.key == "ctmask.head":
            p.value = "paper"
    onnx.save(model, str(liar))
    report = check_parity(pooled_run / "cls.pt", liar, [synth_dir / "images"], max_images=2, batch_size=2,
                          noise_levels=())
    assert not report["passed"] and report["metadata_mismatches"]["head"] == {"graph": "paper",
                                                                              "checkpoint": "pooled"}


def test_a_cache_file_of_the_wrong_shape_is_recomputed(tmp_path):
    from torch.utils.data import TensorDataset

    from ctmask.training.roi_cache import FORMAT, cached_rois

    good = TensorDataset(torch.zeros(4, 64, 5), torch.zeros(4, dtype=torch.int64))
    cached_rois(tmp_path, lambda: "k" * 64, lambda: good, 4, 64)
    path = next(tmp_path.glob("rois-*.pt"))
    torch.save({"format": FORMAT, "key": "k" * 64, "rois": torch.zeros(3, 64, 5),
                "labels": torch.zeros(3, dtype=torch.int64)}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = cached_rois(tmp_path, lambda: "k" * 64, lambda: good, 4, 64)
    assert len(again) == 4 and any("expected 4 slices" in str(w.message) for w in caught)
    path.write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached_rois(tmp_path, lambda: "k" * 64, lambda: good, 4, 64)
    assert all("weights_only" not in str(w.message) for w in caught) and caught
