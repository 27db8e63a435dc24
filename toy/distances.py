"""Sample distances between learned and target distributions, with their noise floor.

``energy_distance(x, y)`` is the V-statistic ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (>= 0, 0 iff equal
laws in the limit). For two independent samples of the *same* law of size n it is positive with
mean O(1/n): that value, ``noise_floor``, is the smallest distance a perfect model can show at this
sample size (docs/toy.md derives the test tolerances from it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def _mean_pdist(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    tot = 0.0
    for i in range(0, a.shape[0], chunk):
        tot += torch.cdist(a[i:i + chunk], b).sum().item()
    return tot / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """V-statistic energy distance between samples x (n, d) and y (m, d), float64."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    return 2 * _mean_pdist(x, y) - _mean_pdist(x, x) - _mean_pdist(y, y)


def noise_floor(sample_fn: Callable[[int], torch.Tensor | np.ndarray], n: int, repeats: int = 3) -> tuple[float, float]:
    """Mean and standard deviation of ``energy_distance`` between two independent samples of size
    ``n`` of the same law; ``sample_fn(n)`` draws one sample (it carries its own generator)."""
    vals = [energy_distance(sample_fn(n), sample_fn(n)) for _ in range(repeats)]
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if repeats > 1 else 0.0
