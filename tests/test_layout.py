"""Architecture rules of STYLE.md: imports only go downward, and theory/toy never import diffusers."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_theory_imports_no_torch_toy_scale_or_diffusers():
    assert not _imports("theory") & {"torch", "toy", "scale", "diffusers", "peft", "accelerate"}


def test_toy_never_imports_scale_or_diffusers():
    assert not _imports("toy") & {"scale", "diffusers", "peft", "accelerate"}
