"""Toy tier of dualunlearn: small torch score networks trained with the primal-dual algorithms and
checked against the closed-form targets of ``theory``. Its subpackage ``toy.core`` holds what the
scale tier reuses (diffusion math in tensors, targets and estimators, the dual state, run
directories); ``scale`` imports nothing else of ``toy``. Never imports diffusers.
"""
