"""Effect of the RPN min size (1e-3 vs 0.0) on the ranked RoIs and S's calls of a trained
classifier checkpoint. Usage: measure.py CLS.pt SPLIT.txt [BATCH]"""
import dataclasses, json, sys, time
import numpy as np, torch
from torch.utils.data import DataLoader
from ctmask.data.covidx import read_split
from ctmask.training.checkpoint import load_checkpoint
from ctmask.training.datasets import ClassificationDataset, collate_classification
from ctmask.training.detector import image_list, normalize
from ctmask.training.evaluate import load_classifier
from ctmask.training.ranked_rois import RankedRoIs

torch.set_num_threads(1)
ck = load_checkpoint(sys.argv[1], kind="classifier")
entries = read_split(sys.argv[2])
bs = int(sys.argv[3]) if len(sys.argv) > 3 else 8
model = load_classifier(ck)
p = ck.preset
rankers = {ms: RankedRoIs(model.detector, dataclasses.replace(p, rpn_min_size=ms)) for ms in (1e-3, 0.0)}
print("preset", p.name, "stored rpn_min_size", p.rpn_min_size, "N", p.n_rois, "slices", len(entries))
loader = DataLoader(ClassificationDataset(entries, p.image_size, cache_bytes=0), batch_size=bs,
                    collate_fn=collate_classification)
rows = {ms: [] for ms in rankers}; logits = {ms: [] for ms in rankers}; labels = []; zero_slots = []; tv_ok = []
t = time.time()
with torch.no_grad():
    for images, y in loader:
        labels.append(y)
        for ms, r in rankers.items():
            rr = r(images)
            rows[ms].append(rr); logits[ms].append(model.classifier(rr))
        feats = model.detector.backbone(normalize(images))
        prop, valid = rankers[0.0].proposals([feats[str(i)] for i in range(len(rankers[0.0].strides))])
        zero_slots.append((((prop[..., 3] - prop[..., 1]) <= 0) | ((prop[..., 2] - prop[..., 0]) <= 0)) & valid)
        # torchvision's eager post-processing with the same min size picks the same candidates
        d = model.detector
        d.rpn.min_size = 0.0
        d.roi_heads.score_thresh, d.roi_heads.nms_thresh, d.roi_heads.detections_per_img = p.cls_score_thresh, p.cls_nms_thresh, p.n_rois
        il = image_list(normalize(images))
        props, _ = d.rpn(il, feats)
        dets, _ = d.roi_heads(feats, props, il.image_sizes)
        rr = rows[0.0][-1]
        for i, det in enumerate(dets):
            k = len(det["scores"])
            tv_ok.append(bool(torch.allclose(rr[i, :k, 0], det["scores"], atol=1e-6)) and int((rr[i, :, 0] > 0).sum()) == k)
        d.rpn.min_size = p.rpn_min_size
y = torch.cat(labels).numpy()
a, b = torch.cat(rows[1e-3]), torch.cat(rows[0.0])
la, lb = torch.cat(logits[1e-3]), torch.cat(logits[0.0])
diff_rows = (a - b).abs().amax(-1) > 1e-6  # [B, N]
pa, pb = la.argmax(-1).numpy(), lb.argmax(-1).numpy()
zs = torch.cat(zero_slots).sum(1).float()
out = {
    "checkpoint": sys.argv[1], "split": sys.argv[2], "slices": len(y), "n_rois": p.n_rois,
    "rows_total": int(diff_rows.numel()), "rows_differ": int(diff_rows.sum()),
    "slices_with_differing_rows": int(diff_rows.any(1).sum()),
    "padding_rows_1e-3": int((a[..., 0] == 0).sum()), "padding_rows_0": int((b[..., 0] == 0).sum()),
    "zero_area_post_nms_slots_per_slice_at_0": {"mean": round(float(zs.mean()), 2), "max": int(zs.max()), "of": p.rpn_post_nms_top_n_test},
    "calls_changed": int((pa != pb).sum()),
    "accuracy_1e-3": round(float((pa == y).mean()), 4), "accuracy_0": round(float((pb == y).mean()), 4),
    "max_abs_logit_change": round(float((la - lb).abs().max()), 5),
    "torchvision_eager_at_0_matches_rankedrois_at_0": f"{sum(tv_ok)}/{len(tv_ok)}",
    "seconds": round(time.time() - t, 1),
}
print(json.dumps(out, indent=1))
