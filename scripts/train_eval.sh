#!/usr/bin/env bash
# The end-to-end recipe of the `small` preset on the synthetic benchmark: synth ->
# train-seg -> train-cls heads (the pooled head; the paper's S: then heads+bn, fine-tuned from
# heads) -> evaluate.
# `make accuracy` runs it at full size (issue: >= 90% accuracy and COVID-19 sensitivity
# with <= 30 minutes of training on 2 CPU cores); `make demo` runs it smaller.
# Usage: scripts/train_eval.sh OUT [SLICES] [SEG_EPOCHS] [HEADS_EPOCHS] [SEED]; needs `make install`.
# SEED (default 0) seeds all training (S's initialisation, data order, sampling); the
# synthetic data always uses seed 0. Same seed, same machine and thread count: the same
# checkpoints, bit for bit.
# REUSE=DIR (environment): take DIR/data and DIR/seg.pt from an earlier run and redo only
# the classifier stages and their evaluation (seed spread: REUSE=runs/accuracy ... 100 1).
# PERTURB / CONSISTENCY / PERTURB_BN (environment): S also trains on the RoIs of the detector
# perturbed at these relative noise scales, with a penalty on the logit change, and the
# heads+bn epoch cycles through perturbed forward passes, so the class calls survive FP16 /
# INT8 (docs/precision.md); PERTURB= PERTURB_BN= CONSISTENCY=0 trains on exact RoIs
# only, as the paper does.
set -euo pipefail
OUT=${1:?usage: scripts/train_eval.sh OUT [SLICES] [SEG_EPOCHS] [HEADS_EPOCHS] [SEED]}
SLICES=${2:-2500}
SEG_EPOCHS=${3:-6}
HEADS_EPOCHS=${4:-100}
SEED=${5:-0}
REUSE=${REUSE:-}
# HEAD (environment): the classifier head, pooled or paper; default: the small preset's.
HEAD=${HEAD:-$(${PYTHON:-.venv/bin/python} -c "from ctmask.core.presets import SMALL; print(SMALL.head)")}
case "$HEAD" in pooled|paper) ;; *) echo "HEAD=$HEAD: expected pooled or paper" >&2; exit 2 ;; esac
PERTURB=${PERTURB-1e-3,3e-3,1e-2,2e-2,4e-2}
CONSISTENCY=${CONSISTENCY-1.0}
PERTURB_BN=${PERTURB_BN-1e-3,1e-2,3e-2}
[ -n "$PERTURB" ] || CONSISTENCY=0
# The recipe is defined on 2 threads: torch's float sums depend on the thread count, and S
# is fed near-tied ranked RoIs, so another count can move the classifier. Idle OpenMP
# threads sleep instead of spinning: on a busy machine spinning made each training step
# 3-4x slower; the results are the same either way.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
CT=${CTMASK:-.venv/bin/ctmask}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
stamp() { date +%s; }

if [ -n "$REUSE" ]; then
  DATA="$REUSE/data"
  SEG="$REUSE/seg.pt"
  [ -f "$SEG" ] || { echo "REUSE=$REUSE: $SEG does not exist" >&2; exit 2; }
else
  DATA="$OUT/data"
  SEG="$OUT/seg.pt"
  "$CT" synth "$DATA" --slices "$SLICES" --seed 0 -q > "$OUT/synth.txt"
fi
SPLITS=(--train-split "$DATA/train_COVIDx_CT.txt" --val-split "$DATA/val_COVIDx_CT.txt")

t0=$(stamp)
# 1. segmentation model
if [ -z "$REUSE" ]; then
  "$CT" train-seg "$DATA/segmentation/train" --preset small --out "$SEG" --seed "$SEED" \
    --epochs "$SEG_EPOCHS" --batch-size 4 --lr 5e-4 --weight-decay 1e-4 --json "$OUT/train-seg.json"
fi
t1=$(stamp)
if [ "$HEAD" = pooled ]; then
  # 2. the pooled head (docs/model.md, "Stable head"): heads variant on the frozen detector's exact
  # RoIs, cached in $OUT/roi-cache (a rerun with another seed skips the detector); its calls
  # survive input noise and reduced precision without perturbed copies or a heads+bn stage.
  "$CT" train-cls "$SEG" --preset small --variant heads --head pooled "${SPLITS[@]}" --seed "$SEED" \
    --out "$OUT/cls.pt" --epochs "$HEADS_EPOCHS" --batch-size 8 --lr 3e-4 --roi-cache "$OUT/roi-cache" \
    --json "$OUT/train-cls.json"
  t2=$(stamp)
  t3=$t2
else
  # 2. the paper's S, variant heads: the detector is frozen, so its ranked RoIs are computed once
  "$CT" train-cls "$SEG" --preset small --variant heads --head paper "${SPLITS[@]}" --seed "$SEED" \
    --out "$OUT/cls-heads.pt" --epochs "$HEADS_EPOCHS" --batch-size 8 --lr 1e-4 --perturb "$PERTURB" \
    --consistency "$CONSISTENCY" --json "$OUT/train-cls-heads.json"
  t2=$(stamp)
  # 3. classifier, variant heads+bn, fine-tuned from the heads classifier for one epoch
  "$CT" train-cls "$OUT/cls-heads.pt" --preset small --variant heads+bn "${SPLITS[@]}" --seed "$SEED" \
    --out "$OUT/cls.pt" --epochs 1 --batch-size 8 --lr 1e-4 --perturb "$PERTURB_BN" --json "$OUT/train-cls.json"
  t3=$(stamp)
fi

"$CT" evaluate "$OUT/cls.pt" --split "$DATA/test_COVIDx_CT.txt" --json "$OUT/eval-cls.json" -q
if [ -z "$REUSE" ]; then
  "$CT" evaluate "$SEG" --seg-dir "$DATA/segmentation/test" --json "$OUT/eval-seg.json" -q
fi
echo "training wall time (seed $SEED, head $HEAD): segmentation $((t1 - t0)) s, heads $((t2 - t1)) s," \
  "heads+bn $((t3 - t2)) s, total $((t3 - t0)) s" | tee "$OUT/training-time.txt"
"$PY" -c "import json, sys; c = json.load(open(sys.argv[1]))['splits']; \
print('small preset trained on', c['train']['n'], 'SYNTHETIC training slices (' + \
', '.join(f'{k} {v}' for k, v in c['train']['classes'].items()) + '), evaluated on', \
c['test']['n'], 'test slices; reports in', sys.argv[2])" "$DATA/synth.json" "$OUT/"
