"""The package's shape: its folders are floors, each importing only from its own floor or lower
ones, with no import loops; and the numpy-only floors never import torch.

The import graph is read from the source (every ``import`` / ``from ... import`` statement,
module-level or inside a function, ``TYPE_CHECKING`` blocks included): a lazy import is still
an arrow of the architecture.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ctmask"

# Lowest first. The top-level modules (ctmask/__init__.py: the version; __main__.py: the CLI's
# entry) are the ground and the roof.
FLOORS = ("core", "scans", "data", "trt", "runtime", "calibration", "training", "exporter", "backends", "pacs",
          "scale", "cli")
GROUND = {"ctmask"}
ROOF = {"ctmask.__main__"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the ctmask modules it imports (``from pkg import mod`` resolved to the module)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Call) and _dynamic_import(node):
                targets = [node.args[0].value]  # importlib.import_module("ctmask.x") / __import__("ctmask.x")
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:  # `import ctmask.core.errors.X` -> the module that exists
                    t = t.rpartition(".")[0]
                if t and t != mod and t.split(".")[0] == root.name:
                    edges[mod].add(t)
    return {m: edges.get(m, set()) for m in files}


def _dynamic_import(call: ast.Call) -> bool:
    """``importlib.import_module("...")``, ``import_module("...")`` or ``__import__("...")`` with a
    literal name."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return (name in ("import_module", "__import__") and bool(call.args) and isinstance(call.args[0], ast.Constant)
            and isinstance(call.args[0].value, str))


def floor_of(mod: str) -> int:
    if mod in GROUND:
        return -1
    if mod in ROOF:
        return len(FLOORS)
    parts = mod.split(".")
    if len(parts) < 2 or parts[1] not in FLOORS:
        raise AssertionError(f"{mod}: in no floor; add its folder to FLOORS in tests/test_layering.py")
    return FLOORS.index(parts[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b} ({FLOORS[floor_of(a)] if floor_of(a) < len(FLOORS) else 'roof'} imports "
                  f"{FLOORS[floor_of(b)] if 0 <= floor_of(b) < len(FLOORS) else b})"
                  for a, bs in graph.items() for b in bs if floor_of(b) > floor_of(a))


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    loops.append(sorted(comp))
    return sorted(loops)


def test_every_module_is_on_a_floor():
    for mod in import_graph():
        floor_of(mod)


def test_no_floor_imports_a_higher_one():
    assert upward_imports(import_graph()) == []


def test_no_import_loops():
    assert import_loops(import_graph()) == []


def _planted(tmp_path: Path, module: str, line: str) -> dict[str, set[str]]:
    copy = tmp_path / "ctmask"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy.joinpath(*module.split(".")[1:]).with_suffix(".py")
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {line}\n")
    return import_graph(copy)


def test_the_check_sees_a_planted_upward_import(tmp_path):
    """A lazy import of the CLI from the ground floor fails the check, named."""
    graph = _planted(tmp_path, "ctmask.core.errors", "from ctmask.cli.main import app  # noqa")
    assert "ctmask.core.errors -> ctmask.cli.main (core imports cli)" in upward_imports(graph)


def test_the_check_sees_a_planted_dynamic_import(tmp_path):
    graph = _planted(tmp_path, "ctmask.scans.sniff", "importlib.import_module('ctmask.backends.registry')  # noqa")
    assert "ctmask.scans.sniff -> ctmask.backends.registry (scans imports backends)" in upward_imports(graph)


def test_the_check_sees_a_planted_loop(tmp_path):
    """Two modules of one floor importing each other (allowed by floor, refused as a loop)."""
    graph = _planted(tmp_path, "ctmask.core.presets", "from ctmask.core import spec  # noqa")
    loops = import_loops(graph)
    assert any({"ctmask.core.presets", "ctmask.core.spec"} <= set(loop) for loop in loops), loops


def test_core_data_and_runtime_do_not_import_torch():
    code = (
        "import sys, pkgutil, importlib, ctmask.core, ctmask.scans, ctmask.data, ctmask.calibration, "
        "ctmask.runtime, ctmask.pacs, ctmask.cli.main, ctmask.trt.check\n"
        "for pkg in (ctmask.core, ctmask.scans, ctmask.data, ctmask.calibration, ctmask.runtime, ctmask.pacs):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "bad = sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.'))\n"
        "print(len(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stdout + out.stderr


def test_no_torch_import_statement_in_torch_free_layers():
    """Lazy imports escape the test above; the runtime must not hold one at all."""
    import re

    pattern = re.compile(r"^\s*(import (\w+, *)*torch(vision)?\b|from torch(vision)?\b)|"
                         r"(import_module|__import__)\(['\"]torch", re.M)
    files = [p for layer in ("core", "scans", "data", "calibration", "runtime", "pacs", "scale")
             for p in sorted((ROOT / layer).rglob("*.py"))]
    files += sorted((ROOT / "trt").rglob("check*.py")) + [ROOT / "trt" / "support.py"]
    offenders = [f"{p.relative_to(ROOT)}:{m.group(0).strip()}" for p in files for m in pattern.finditer(p.read_text())]
    assert offenders == []


MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def oversized(root: Path) -> list[str]:
    """Files of more than MAX_FILE_LINES lines and functions (signature and docstring included) of
    more than MAX_FUNCTION_LINES under ``root``: each usually holds two jobs."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            found.append(f"{path.relative_to(root.parent)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}: {n} lines")
    return found


def test_no_file_or_function_outgrows_one_job():
    assert oversized(ROOT) == []


def test_the_size_check_sees_a_long_function(tmp_path):
    pkg = tmp_path / "ctmask"
    pkg.mkdir()
    (pkg / "long.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert oversized(pkg) == ["ctmask/long.py:1 f: 81 lines"]
