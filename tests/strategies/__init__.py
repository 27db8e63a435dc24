"""The one place for hypothesis strategies: constructive, no ``assume`` where avoidable.
Finite-distribution strategies live in ``tests.strategies.discrete``, mixture strategies in
``tests.strategies.gmm``; import them from here."""
from tests.strategies.gmm import alpha_bars, covariances, gaussian_mixtures, mixture_weights, unlearning_instances  # noqa: F401
from tests.strategies.discrete import *  # noqa: F401,F403
