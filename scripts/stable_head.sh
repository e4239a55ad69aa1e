#!/usr/bin/env bash
# The classifier heads compared on one frozen detector (docs/model.md, "Stable head"): the paper's S
# and the pooled head, each trained with the `heads` variant on the detector's exact ranked RoIs
# for several seeds, then evaluated on the test split with the noise floor (+-0.25 / +-1 gray
# level). The detector's RoIs are computed once and cached (--roi-cache), so every head and
# seed after the first costs only its own training.
# Usage: scripts/stable_head.sh RUN OUT [EPOCHS]  (RUN: a `make accuracy` folder: RUN/data,
# RUN/seg.pt). SEEDS (environment, default "0 1 2"), HEADS (default "pooled paper"),
# LR_pooled / LR_paper (defaults 3e-4 / 1e-4).
set -euo pipefail
RUN=${1:?usage: scripts/stable_head.sh RUN OUT [EPOCHS]}
OUT=${2:?usage: scripts/stable_head.sh RUN OUT [EPOCHS]}
EPOCHS=${3:-100}
SEEDS=${SEEDS:-0 1 2}
HEADS=${HEADS:-pooled paper}
LR_pooled=${LR_pooled:-3e-4}
LR_paper=${LR_paper:-1e-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
CT=${CTMASK:-.venv/bin/ctmask}
PY=${PYTHON:-.venv/bin/python}
DATA="$RUN/data"
CACHE="$OUT/roi-cache"
mkdir -p "$OUT"
for head in $HEADS; do
  lr_var="LR_$head"
  for seed in $SEEDS; do
    t0=$(date +%s)
    "$CT" train-cls "$RUN/seg.pt" --preset small --variant heads --head "$head" --seed "$seed" \
      --train-split "$DATA/train_COVIDx_CT.txt" --val-split "$DATA/val_COVIDx_CT.txt" --epochs "$EPOCHS" \
      --batch-size 8 --lr "${!lr_var}" --roi-cache "$CACHE" --out "$OUT/$head-s$seed.pt" \
      --json "$OUT/train-$head-s$seed.json" -q
    t1=$(date +%s)
    "$CT" evaluate "$OUT/$head-s$seed.pt" --split "$DATA/test_COVIDx_CT.txt" --roi-cache "$CACHE" \
      --json "$OUT/eval-$head-s$seed.json" -q
    echo "$head seed $seed: train-cls $((t1 - t0)) s, evaluate $(($(date +%s) - t1)) s"
  done
done
"$PY" - "$OUT" $HEADS <<'EOF'
import json, sys
from pathlib import Path
out, heads = Path(sys.argv[1]), sys.argv[2:]
rows = []
for head in heads:
    evals = sorted(out.glob(f"eval-{head}-s*.json"))
    accs = []
    for f in evals:
        r = json.loads(f.read_text())
        lv = {x["gray_levels"]: x["changed_calls"] for x in r["noise_floor"]["levels"]}
        accs.append(r["accuracy"])
        print(f"{head:<7} {f.stem.split('-')[-1]:<4} accuracy {r['accuracy']:.2%}  COVID-19 sensitivity "
              f"{r['per_class']['covid19']['sensitivity']:.2%}  calls changed by noise +-0.25: {lv[0.25]} / "
              f"{r['noise_floor']['n']}, +-1: {lv[1.0]}")
    if accs:
        print(f"{head:<7} mean accuracy {sum(accs) / len(accs):.2%} over {len(accs)} seeds, range "
              f"{100 * (max(accs) - min(accs)):.2f} points")
EOF
