#!/usr/bin/env bash
# The test split's slices of a synthetic benchmark, by link, in one (new) folder: what the model
# never saw in training. Usage: scripts/held_out.sh DATA HELD  (DATA holds images/ and
# test_COVIDx_CT.txt; HELD is emptied first).
set -euo pipefail
DATA=${1:?usage: scripts/held_out.sh DATA HELD}
HELD=${2:?usage: scripts/held_out.sh DATA HELD}
rm -rf "$HELD" && mkdir -p "$HELD"
while read -r name _; do
  ln -s "$(cd "$DATA/images" && pwd)/$name" "$HELD/$name"
done < "$DATA/test_COVIDx_CT.txt"
