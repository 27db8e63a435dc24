"""The torch core that the toy and scale tiers share, written once: the diffusion process in tensors
(``toy.core.diffusion``: forward noising, reverse-step coefficients, strided chains, Tweedie), the
score-space targets, losses and constraint estimators (``toy.core.objectives``), the dual side of
every primal-dual algorithm (``toy.core.dual``: violations, projected ascent, the dual domain) and run
directories (``toy.core.runs``: ``RunDir`` and the names below it, re-exported; ``toy.core.identity``
fingerprints and ``run.json``, ``toy.core.files`` atomic writes, ``toy.core.lock`` one process per
directory, ``toy.core.checkpoints`` checkpoints, ``toy.core.events`` errors, announcements and test
pause points), and the type aliases their signatures share (``toy.core.hints``: ``EpsModel``,
``Floats``).

``scale`` may import this subpackage and nothing else of ``toy`` (``tests/test_layout.py`` checks it).
"""
