"""The README and the documentation site: the README stays short and starts with the two
commands; every module the docs name exists (a module moved without its docs fails here;
`make test` also runs `mkdocs build --strict` for links and pages)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def doc_texts() -> dict[Path, str]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return {f: f.read_text() for f in files}


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    fence = lines.index("```")
    assert lines[fence + 1:fence + 4] == ["make demo", "make test", "```"]
    assert not any(line.startswith("```") for line in lines[:fence])  # the first block of the README


def test_every_module_the_docs_name_exists():
    packages = {p.name for p in (ROOT / "ctmask").iterdir() if (p / "__init__.py").exists()}
    missing = []
    for file, text in doc_texts().items():
        for path in re.findall(r"\bctmask/[\w/]+(?:\.py)?", text):
            if not (ROOT / path).exists():
                missing.append(f"{file.relative_to(ROOT)}: {path}")
        for dotted in re.findall(r"(?<![\w/.])ctmask\.(\w+)\.(\w+)", text):
            package, module = dotted
            if package in packages and not ((ROOT / "ctmask" / package / f"{module}.py").exists()
                                            or (ROOT / "ctmask" / package / module).is_dir()):
                missing.append(f"{file.relative_to(ROOT)}: ctmask.{package}.{module}")
    assert not missing, missing


def test_every_ctmask_import_in_the_scripts_resolves():
    """The scripts (scripts/*.sh, *.py) import ctmask in embedded Python: a moved or renamed name
    fails here, not at the end of an hour-long experiment."""
    import importlib

    pattern = re.compile(r"^\s*from (ctmask(?:\.\w+)*) import ([\w, ]+)$", re.M)
    seen, missing = 0, []
    for script in sorted((ROOT / "scripts").glob("*")):
        if script.suffix not in (".sh", ".py"):
            continue
        for module, names in pattern.findall(script.read_text()):
            mod = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",") if n.strip()):
                seen += 1
                if not hasattr(mod, name):
                    missing.append(f"{script.name}: {module}.{name}")
    assert seen > 10 and missing == []
