"""Theory tier of dualunlearn: closed-form unlearning targets, dual functions and certified duality
gaps on finite distributions (``theory.discrete``) and Gaussian mixtures (``theory.gmm``), in
numpy/scipy/cvxpy, float64, without torch.

The mathematics, with numbered equations, is in ``docs/math.md``; the decisions and evidence of
each package in ``docs/theory-discrete.md`` and ``docs/theory-gmm.md``.
"""

from theory.validation import PROBLEMS

__all__ = ["PROBLEMS"]
