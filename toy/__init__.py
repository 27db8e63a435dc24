"""Toy tier of dualunlearn: small torch score networks trained with the primal-dual algorithms and
checked against the closed-form targets of ``theory``. Also owns the pieces ``scale`` reuses: the
dual state and its projected ascent (``toy.dual``), the score-space targets and losses
(``toy.objectives``) and run bookkeeping (``toy.runs``). Never imports diffusers.
"""
