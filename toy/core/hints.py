"""Type aliases the toy and scale tiers share in their signatures: the model contract of every tier,
``model(x_t, t) -> eps`` (``EpsModel``), and a vector of numbers as callers hand it over (``Floats``:
a tensor, an array or a sequence, turned into a tensor with ``torch.as_tensor``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

#: the model contract: ``model(x_t, t) -> eps`` (an ``nn.Module``, an exact ``MixtureEps``, a composition)
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: numbers as callers hand them over: a tensor, an array or a sequence (``torch.as_tensor`` takes each)
Floats = torch.Tensor | np.ndarray | Sequence[float]
