"""The architecture rules of DEVELOPERS.md, checked on the source: who may import what."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["dreamloom", "engine", "storage", "studio", "bot", "gallery", "cli"]
FORBIDDEN = {
    "engine": {"studio", "storage", "bot", "gallery", "discord", "sqlalchemy"},
    "storage": {"engine", "studio", "bot", "gallery", "torch", "diffusers", "discord"},
    "studio": {"torch", "diffusers", "transformers", "peft", "discord", "bot", "gallery", "cli"},
    "gallery": {"torch", "diffusers", "transformers", "peft", "discord", "engine", "storage"},
    "bot": {"torch", "diffusers", "transformers", "peft", "engine", "storage"},
    "dreamloom": {"engine", "storage", "studio", "bot", "gallery", "cli", "torch", "diffusers", "discord"},
    # The command line wires the front doors to the studio (the composition root); it still never touches torch or
    # discord itself: the engine and the bot do.
    "cli": {"torch", "diffusers", "transformers", "peft", "discord"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_respect_the_layers(package):
    folder = ROOT / package
    if not folder.is_dir():
        pytest.skip(f"{package}/ does not exist yet")
    offenders = {}
    for path in folder.rglob("*.py"):
        bad = imported_roots(path) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, offenders


def test_the_checker_sees_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch.nn\nfrom diffusers import X\nfrom . import sibling\n")
    assert imported_roots(sample) == {"torch", "diffusers"}
