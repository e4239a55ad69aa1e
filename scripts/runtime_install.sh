#!/usr/bin/env bash
# The torch-free runtime install, measured: builds ctmask's wheel from this checkout, installs it
# with no extras into a fresh virtualenv (dependencies from pip's index), checks that no torch came
# with it, runs `ctmask infer` (and the other runtime commands) there, and reports the size of its
# site-packages with the largest distributions.
#
#   scripts/runtime_install.sh MODEL.onnx IMAGE_OR_FOLDER... [-- INFER_OPTIONS...]
#
# MODEL: a ctmask ONNX graph (e.g. `ctmask export runs/robust3/cls.pt --out /tmp/rt/model.onnx`,
# run where the train extra is installed). Environment: VENV (default /tmp/rtenv, deleted and
# recreated), OUT (default /tmp/rt-out: wheel, predictions, report), PY (default python3, >= 3.10).
# With REFERENCE=preds.jsonl (an `infer --out` of the same model and slices elsewhere, e.g. with
# the full dev install), the predictions must match it.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n 2,13p "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
VENV=${VENV:-/tmp/rtenv}
OUT=${OUT:-/tmp/rt-out}
MODEL=$(realpath "$1")
shift
IMAGES=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    IMAGES+=("$(realpath "$1")")
    shift
done
[ $# -gt 0 ] && shift  # the "--"
INFER_OPTS=("$@")

rm -rf "$OUT" "$VENV"
mkdir -p "$OUT/src"
# Build from a copy: an in-tree build would leave build/ in the checkout.
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$OUT/src/"
cp -r "$ROOT/ctmask" "$OUT/src/ctmask"
find "$OUT/src" -name __pycache__ -prune -exec rm -rf {} +
echo "== building the wheel"
"$PY" -m pip wheel -q --no-deps -w "$OUT/dist" "$OUT/src"
WHEEL=$(ls "$OUT"/dist/ctmask-*.whl)
echo "$WHEEL"

echo "== fresh venv $VENV: pip install $(basename "$WHEEL") (no extras)"
"$PY" -m venv "$VENV"
start=$(date +%s)
"$VENV/bin/pip" install -q "$WHEEL"
echo "installed in $(($(date +%s) - start)) s"
"$VENV/bin/pip" list --format=freeze > "$OUT/pip-list.txt"
cat "$OUT/pip-list.txt"
if grep -iE '^(torch|torchvision|onnxscript|safetensors|onnxconverter-common|nvidia-.*|triton)==' "$OUT/pip-list.txt"; then
    echo "FAIL: the runtime install pulled the packages above" >&2
    exit 1
fi
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "FAIL: torch is importable in $VENV" >&2
    exit 1
fi

echo "== ctmask infer (torch-free)"
cd "$OUT"  # not the checkout: `import ctmask` must find the installed wheel
"$VENV/bin/ctmask" --version
TIMED=()
[ -x /usr/bin/time ] && TIMED=(/usr/bin/time -f "infer: %e s wall, %M KiB max RSS")
"${TIMED[@]}" "$VENV/bin/ctmask" infer "$MODEL" "${IMAGES[@]}" --out "$OUT/preds.jsonl" "${INFER_OPTS[@]}"
echo "$(wc -l < "$OUT/preds.jsonl") predictions in $OUT/preds.jsonl"
if [ -n "${REFERENCE:-}" ]; then
    "$VENV/bin/python" - "$OUT/preds.jsonl" "$REFERENCE" <<'EOF'
import json, sys
got, want = ([json.loads(line) for line in open(p)] for p in sys.argv[1:3])
assert [(r["file"], r["class"]) for r in got] == [(r["file"], r["class"]) for r in want], "class calls differ"
diff = max(abs(g["probs"][k] - w["probs"][k]) for g, w in zip(got, want) for k in g["probs"])
assert diff <= 1e-5, f"probabilities differ by {diff}"
print(f"same calls as {sys.argv[2]}; max |dprob| {diff:.2g}")
EOF
fi

echo "== the other runtime commands"
"$VENV/bin/ctmask" bench "$MODEL" --backend onnxruntime-cpu -b 1 --warmup 1 --iterations 3 -q
"$VENV/bin/ctmask" bench "$MODEL" --backend onnxruntime-cpu --backend torch-cpu -b 1 --iterations 1 -q \
    2> "$OUT/bench-torch.err" && { echo "FAIL: bench ran torch-cpu" >&2; exit 1; }
cat "$OUT/bench-torch.err"
"$VENV/bin/ctmask" calibrate "$MODEL" --images "${IMAGES[0]}" --out "$OUT/ranges.json" --size 4 -b 4 -q
"$VENV/bin/ctmask" synth "$OUT/synth" -n 3 --workers 1 -q > /dev/null
echo "synth: $(ls "$OUT/synth/images" | wc -l) slices"
"$VENV/bin/ctmask" export "$OUT/none.pt" --out "$OUT/none.onnx" 2> "$OUT/export.err" \
    && { echo "FAIL: export ran without torch" >&2; exit 1; }
cat "$OUT/export.err"

echo "== size"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
du -sh "$SITE" | tee "$OUT/size.txt"
"$VENV/bin/python" - "$SITE" <<'EOF' | tee -a "$OUT/size.txt"
# Installed bytes per distribution, from its RECORD (what `pip uninstall` would remove).
import sys
from importlib import metadata
from pathlib import Path

site = Path(sys.argv[1])
sizes = {}
for dist in metadata.distributions(path=[str(site)]):
    total = 0
    for f in dist.files or []:
        p = Path(dist.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    sizes[f"{dist.metadata['Name']} {dist.version}"] = total
for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:15]:
    print(f"{size / 2**20:9.1f} MiB  {name}")
print(f"{sum(sizes.values()) / 2**20:9.1f} MiB  all {len(sizes)} distributions")
own = sum(v for k, v in sizes.items() if k.split()[0].lower() not in ("pip", "setuptools"))
print(f"{own / 2**20:9.1f} MiB  without the venv's own pip and setuptools")
EOF
