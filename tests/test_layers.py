"""The layered design, checked on the source: dependencies flow one way, and no package reaches into
another's private modules. Fails the moment an import breaks a rule, naming the file and the import."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import diffship

ROOT = Path(diffship.__file__).parent
#: what each package may import besides itself and the shared top-level modules (errors, _files, _cache,
#: _isolate, progress). configs and reference are leaves; exporters and runtimes never import each other.
ALLOWED = {
    "configs": set(),
    "reference": set(),
    "backends": {"reference", "configs"},
    "exporters": {"backends", "reference", "configs"},
    "runtimes": {"backends", "reference", "configs"},
    "workflows": {"exporters", "runtimes", "backends", "reference", "configs"},
    "parity": {"runtimes", "backends", "reference", "configs"},
    "packaging": {"runtimes", "backends", "reference", "configs"},
    "bench": {"workflows", "parity", "runtimes", "backends", "reference", "configs"},
    "cli": {"bench", "packaging", "parity", "workflows", "exporters", "runtimes", "backends", "reference", "configs"},
}
SHARED = {"errors", "_files", "_cache", "_isolate", "progress"}


def imported_modules(path: Path) -> set[str]:
    """Every ``diffship...`` module a file imports (relative imports resolved), at any depth of the file."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "diffship" or m.startswith("diffship.")}


def violations() -> list[str]:
    broken = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        own = parts[0] if len(parts) > 1 else None
        for module in sorted(imported_modules(path)):
            bits = module.split(".")
            if len(bits) < 2 or bits[1].startswith("__"):  # the package itself (__version__)
                continue
            target = bits[1]
            rel = path.relative_to(ROOT.parent)
            if own in ALLOWED and target != own and target not in SHARED and target not in ALLOWED[own]:
                broken.append(f"{rel}: {own} may not import {module}")
            private = [b for b in bits[2:] if b.startswith("_") and not b.startswith("__")]
            if target != own and private:
                broken.append(f"{rel}: imports the private module {module} of another package")
    return broken


def test_dependencies_flow_one_way():
    assert violations() == []


def test_the_check_catches_a_broken_rule(tmp_path, monkeypatch):
    """The checker itself finds an exporter importing a runtime (so the test above can fail)."""
    fake = tmp_path / "diffship"
    (fake / "exporters").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "exporters" / "x.py").write_text("from diffship.runtimes.mil import MilReference\n"
                                             "from diffship.configs import _private\n")
    (fake / "configs").mkdir()
    (fake / "configs" / "y.py").write_text("from diffship.parity import metrics\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    found = violations()
    assert any("exporters may not import diffship.runtimes" in v for v in found)
    assert any("private module diffship.configs._private" in v for v in found)
    assert any("configs may not import diffship.parity" in v for v in found)
