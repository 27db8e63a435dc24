"""Theory tier of dualunlearn: closed-form unlearning targets, dual functions and certified duality
gaps on finite distributions and Gaussian mixtures (numpy/scipy/cvxpy, float64, no torch).

See ``../shared/MATH.md`` and ``docs`` in the README for what is stated, derived and decided.
"""

__all__ = ["PROBLEMS"]

#: The three problems of MATH.md §1, by the names every public function takes.
PROBLEMS = ("reverse_kl", "forward_kl", "likelihood")
