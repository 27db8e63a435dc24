"""The ``dualunlearn`` application shell, above the three tiers: the command line (``dualunlearn.cli``:
``dualunlearn verify``, ``dualunlearn toy``, ``dualunlearn scale ...``) and the pre-flight report
that runs every tier (``dualunlearn.verify``). It imports ``theory``, ``toy`` and ``scale``; none of
them imports it (tests/test_layout.py).
"""
