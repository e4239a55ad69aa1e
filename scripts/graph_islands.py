"""Check `export --fp32-blocks` names, and that exported INT8 graphs hold exactly those FP32 blocks.

Usage: python scripts/graph_islands.py BLOCKS [GRAPH...]  (BLOCKS: `export --fp32-blocks`'s value, e.g.
classifier,box_head,box_predictor, read by the same parser `export` uses). Exits 1 with one line naming
the problem when BLOCKS is not a value `export` takes, or when a GRAPH is not a ctmask INT8 graph or
holds other FP32 blocks (its `ctmask.fp32_islands`; `ranking`, FP32 by construction, is not
counted on either side). The scripts that skip an export when its graph already exists
(stable_int8.sh, bench_heads.sh) call this before any work and before reusing a graph, so a graph made
with other islands is never reused under a new FP32_BLOCKS. Only the islands and the precision are
checked: a graph made from other ranges or in the other residual form is not detected.
"""

from __future__ import annotations

import json
import sys

import onnx
from google.protobuf.message import DecodeError

from ctmask.core.errors import CtmaskError
from ctmask.core.spec import GraphSpec
from ctmask.exporter.precision import BLOCKS
from ctmask.exporter.reduced import parse_fp32_blocks
from ctmask.exporter.sensitivity import ALWAYS_FP32


def held_blocks(graph: str) -> set[str]:
    """The FP32 blocks a ctmask FP16 / INT8 graph records (``ranking`` left out), read by the
    runtime's own metadata reader (:meth:`ctmask.core.spec.GraphSpec.from_metadata`)."""
    try:
        proto = onnx.load(graph, format="protobuf", load_external_data=False)  # whatever the file's suffix
        meta = {p.key: p.value for p in proto.metadata_props}
    except (OSError, ValueError, DecodeError) as exc:  # a missing file, a folder, not ONNX
        raise CtmaskError(f"{graph}: not a readable ONNX graph ({type(exc).__name__}: {exc})") from None
    spec = GraphSpec.from_metadata(meta, graph)
    if spec.precision != "int8" or "ctmask.fp32_islands" not in meta:
        raise CtmaskError(f"{graph}: a {spec.precision} graph, not one of `ctmask export --precision int8` (the "
                          "scripts reuse INT8 graphs only)")
    held = json.loads(meta["ctmask.fp32_islands"])  # valid JSON: GraphSpec read it
    if not isinstance(held, dict) or not set(held) <= set(BLOCKS):
        raise CtmaskError(f"{graph}: its ctmask.fp32_islands is not an object of block names (what `export` writes)")
    return set(held) - set(ALWAYS_FP32)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python scripts/graph_islands.py BLOCKS [GRAPH...]", file=sys.stderr)
        return 2
    try:
        asked = set(parse_fp32_blocks(argv[0])) - set(ALWAYS_FP32)
        for graph in argv[1:]:
            held = held_blocks(graph)
            if held != asked:
                raise CtmaskError(f"{graph}: its FP32 blocks are {sorted(held) or 'none'}, not "
                                  f"{sorted(asked) or 'none'} as asked: move it away (or write to another folder) "
                                  "and run again")
    except CtmaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
