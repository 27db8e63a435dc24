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


def test_gaussian_mixture_noised_score_matches_finite_differences():
    import numpy as np

    from theory.gmm import GaussianMixture

    g = GaussianMixture([0.3, 0.7], [[0.0, 0.0], [3.0, 1.0]], [np.eye(2), [[2.0, 0.5], [0.5, 1.0]]])
    x = np.random.default_rng(0).normal(size=(7, 2))
    for ab in (1.0, 0.3, 0.01):
        h = 1e-6
        fd = np.stack([(g.log_prob(x + h * e, ab) - g.log_prob(x - h * e, ab)) / (2 * h) for e in np.eye(2)], 1)
        np.testing.assert_allclose(g.score(x, ab), fd, atol=1e-6)
        np.testing.assert_allclose(g.noised(ab).log_prob(x), g.log_prob(x, ab), atol=1e-12)
