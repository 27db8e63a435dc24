"""Shared test set-up: hypothesis profiles (``dev`` fast, ``ci`` derandomised; ``ci`` is the default
under CI=true) and single-threaded torch (small jobs slow down badly when both cores are busy)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass
