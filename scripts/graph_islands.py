"""Check `export --fp32-blocks` names, and that exported graphs hold exactly those FP32 blocks.

Usage: python scripts/graph_islands.py BLOCKS [GRAPH...]  (BLOCKS: `export --fp32-blocks`'s value, e.g.
classifier,box_head,box_predictor). Exits 1 with a message naming the problem when BLOCKS names an
unknown block, or when a GRAPH's FP32 blocks (its `ctmask.fp32_islands`; `ranking`, FP32 by
construction, not counted) are others. The scripts that skip an export when its graph already exists
(stable_int8.sh, bench_heads.sh) call this before any work and before reusing a graph, so a graph made
with other islands is never reused under a new setting.
"""

from __future__ import annotations

import json
import sys

import onnx

from ctmask.exporter.precision import BLOCKS


def main(blocks: str, graphs: list[str]) -> int:
    asked = {b.strip() for b in blocks.split(",") if b.strip() and b.strip() != "none"}
    unknown = asked - set(BLOCKS)
    if unknown or not blocks.strip():
        print(f"FP32 blocks {blocks!r}: {'unknown ' + str(sorted(unknown)) if unknown else 'empty'}; blocks are "
              f"{', '.join(BLOCKS)} (or none)", file=sys.stderr)
        return 1
    for graph in graphs:
        meta = {p.key: p.value for p in onnx.load(graph, load_external_data=False).metadata_props}
        held = set(json.loads(meta.get("ctmask.fp32_islands", "{}"))) - {"ranking"}
        if held != asked:
            print(f"{graph}: its FP32 blocks are {sorted(held) or 'none'}, not {sorted(asked) or 'none'} as asked: "
                  "move it away (or pick another OUT / TAG) and run again", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
