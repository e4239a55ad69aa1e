"""The numpy-only layers (core, scans, data, calibration, runtime) and the TensorRT graph check
(``ctmask.trt.check``) must never import torch."""

from __future__ import annotations

import subprocess
import sys


def test_core_data_and_runtime_do_not_import_torch():
    code = (
        "import sys, pkgutil, importlib, ctmask.core, ctmask.scans, ctmask.data, ctmask.calibration, ctmask.runtime, "
        "ctmask.cli.main, ctmask.trt.check\n"
        "for pkg in (ctmask.core, ctmask.scans, ctmask.data, ctmask.calibration, ctmask.runtime):\n"
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
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ctmask"
    pattern = re.compile(r"^\s*(import torch\b|from torch\b|import torchvision\b|from torchvision\b)", re.M)
    files = [p for layer in ("core", "scans", "data", "calibration", "runtime", "scale")
             for p in sorted((root / layer).rglob("*.py"))]
    files += [root / "trt" / "check.py", root / "trt" / "support.py"]
    offenders = [f"{p.relative_to(root)}:{m.group(0).strip()}" for p in files for m in pattern.finditer(p.read_text())]
    assert offenders == []
