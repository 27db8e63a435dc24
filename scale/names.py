"""The scale tier's method names: the problems of theory and toy (``reverse_kl``, ``forward_kl``,
``likelihood``), their variants and the baselines. These long names are the only spelling configs,
summaries, run directories and reports carry; the short forms of the paper's abbreviations (RU, FU,
LU) are accepted on input only, as aliases (``canonical_method``).

| canonical | alias | problem |
|---|---|---|
| ``reverse_kl`` | ``ru`` | ``reverse_kl`` |
| ``reverse_kl_dual_only`` | ``ru_dual_only`` | ``reverse_kl`` |
| ``esd`` | | ``reverse_kl`` (fixed multiplier) |
| ``likelihood`` | ``lu`` | ``likelihood`` |
| ``forward_kl`` | ``fu`` | ``forward_kl`` |
| ``siss``, ``siss_is`` | | ``forward_kl`` (fixed weight) |
"""

from __future__ import annotations

#: concept unlearning (``scale.concept``)
CONCEPT_METHODS = ("reverse_kl", "reverse_kl_dual_only", "esd", "likelihood")
#: data unlearning (``scale.data``)
DATA_METHODS = ("forward_kl", "siss", "siss_is")
#: the short forms accepted on input, and the canonical name each stands for
ALIASES = {"ru": "reverse_kl", "ru_dual_only": "reverse_kl_dual_only", "lu": "likelihood", "fu": "forward_kl"}
#: the problem (``toy.core.dual.DualState``'s) each method solves or is a baseline of
PROBLEM = {"reverse_kl": "reverse_kl", "reverse_kl_dual_only": "reverse_kl", "esd": "reverse_kl",
           "likelihood": "likelihood", "forward_kl": "forward_kl", "siss": "forward_kl", "siss_is": "forward_kl"}


def canonical_method(name: str, choices: tuple[str, ...], what: str = "method") -> str:
    """``name`` in its canonical spelling (an alias mapped to its long name); a name that is neither
    one of ``choices`` nor an alias of one is a ``ValueError`` listing the choices and the aliases."""
    canon = ALIASES.get(name, name)
    if canon not in choices:
        aliases = [f"{a} = {c}" for a, c in ALIASES.items() if c in choices]
        raise ValueError(f"{what} must be one of {', '.join(choices)}"
                         + (f" (short forms: {', '.join(aliases)})" if aliases else "") + f", got {name!r}")
    return canon
