#!/usr/bin/env bash
# Ray Data batch inference against the local path, on the same inputs, in one run:
#   scripts/ray_check.sh MODEL.onnx INPUT_DIR OUT_DIR [ACTORS CPUS_PER_ACTOR]
# 1. `ctmask infer` (one process) and 2. `ctmask infer --ray` (local cluster) write JSONL slices
# and studies; the files must be identical byte for byte. 3. `infer --ray` again, and the actor
# process is killed with SIGKILL once a third of the slices are done: the output must still be
# identical (nothing lost, nothing twice). Prints slices/s of each run from their --json.
set -euo pipefail
MODEL=$1 INPUTS=$2 OUT=$3 ACTORS=${4:-} CPA=${5:-}
BIN=${BIN:-$(dirname "$0")/../.venv/bin}
mkdir -p "$OUT"
POOL=()
[ -n "$ACTORS" ] && POOL+=(--actors "$ACTORS")
[ -n "$CPA" ] && POOL+=(--cpus-per-actor "$CPA")

"$BIN/ctmask" infer "$MODEL" "$INPUTS" --out "$OUT/local.jsonl" --studies "$OUT/local-st.jsonl" -q \
  --json "$OUT/local.json"
"$BIN/ctmask" infer "$MODEL" "$INPUTS" --ray "${POOL[@]}" --out "$OUT/ray.jsonl" --studies "$OUT/ray-st.jsonl" -q \
  --json "$OUT/ray.json"
cmp "$OUT/local.jsonl" "$OUT/ray.jsonl" && cmp "$OUT/local-st.jsonl" "$OUT/ray-st.jsonl" \
  && echo "ray: slices and studies identical to the local run"

# the kill run: wait for a third of the slices (the progress goes to a --json-less log), then kill
n_total=$(wc -l < "$OUT/local.jsonl")
"$BIN/ctmask" infer "$MODEL" "$INPUTS" --ray "${POOL[@]}" --out "$OUT/kill.jsonl" --studies "$OUT/kill-st.jsonl" \
  -q --json "$OUT/kill.json" &
run=$!
start=$(date +%s)
# seconds per slice of the Ray run above, to kill at a third of the way
third=$(python3 -c "import json; d=json.load(open('$OUT/ray.json')); print(max(5, int(d['seconds'] / 3)))")
sleep "$third"
victim=$(pgrep -f "BoundChunkPredictor" | head -1 || true)
if [ -n "$victim" ]; then
  kill -9 "$victim" && echo "killed actor process $victim after $(( $(date +%s) - start )) s"
else
  echo "no actor process found to kill"; exit 1
fi
wait "$run"
cmp "$OUT/local.jsonl" "$OUT/kill.jsonl" && cmp "$OUT/local-st.jsonl" "$OUT/kill-st.jsonl" \
  && echo "ray with a killed actor: identical to the local run ($n_total slices)"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {n: json.load(open(f"{out}/{n}.json")) for n in ("local", "ray", "kill")}
base = rows["local"]["predicted"] / rows["local"]["seconds"]
for name, d in rows.items():
    rate = d["predicted"] / d["seconds"]
    ray = d.get("ray", {})
    extra = (f"  actors {ray['actors']} x {ray['cpus_per_actor']} CPU, threads {ray['threads']}, listing "
             f"{ray['listing_seconds']} s, chunks by process {ray['chunks_by_worker']}, duplicates dropped "
             f"{ray['duplicates_dropped']}") if ray else ""
    print(f"{name:6} {d['predicted']} slices in {d['seconds']:.1f} s: {rate:.2f} slices/s ({rate / base:.2f}x local)"
          + extra)
PY
