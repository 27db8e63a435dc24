"""Pretraining by denoising score matching (docs/math.md §4, eq. 23): ``min E_{x0, t, z} ||z - eps_theta(x_t, t)||^2``
with ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) z``, t uniform on 0..T-1, on samples of a Gaussian
mixture (fresh every step) or of a finite training set (minibatches of its points); save / load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from theory.gmm import GaussianMixture
from toy.core.hints import Floats
from toy.models import EpsMLP
from toy.core.diffusion import noised
from toy.core.objectives import denoising_loss
from toy.core.runs import CheckpointStore, announce, atomic_torch_save, pause_point

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)


class MixtureData:
    """Fresh samples of a ``GaussianMixture`` each call; ``state``/``set_state`` for resumption."""

    def __init__(self, mixture: GaussianMixture, seed: int):
        self.mixture = mixture
        self.rng = np.random.default_rng(seed)

    def __call__(self, n: int) -> torch.Tensor:
        return torch.as_tensor(self.mixture.sample(n, self.rng), dtype=torch.float32)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, s: dict) -> None:
        self.rng.bit_generator.state = s


class PointData:
    """Minibatches (with replacement) of a finite training set ``points`` (n, d)."""

    def __init__(self, points, seed: int):
        self.points = torch.as_tensor(points, dtype=torch.float32)
        self.gen = torch.Generator().manual_seed(int(seed))

    def __call__(self, n: int) -> torch.Tensor:
        idx = torch.randint(0, self.points.shape[0], (n,), generator=self.gen)
        return self.points[idx]

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def set_state(self, s: torch.Tensor) -> None:
        self.gen.set_state(s)




def train_denoiser(model: EpsMLP, data: Callable[[int], torch.Tensor], alphas_cumprod: Floats, steps: int, batch: int,
                   lr: float, generator: torch.Generator, progress: tqdm | None = None, checkpoint: str | Path | None = None,
                   checkpoint_every: int = 250) -> list[float]:
    """Adam with a cosine-decayed learning rate on the simple (unweighted) denoising loss.
    Returns the per-step losses; raises ``FloatingPointError`` with the step number on NaN/Inf.

    With ``checkpoint`` (a folder path), the whole state (weights, optimizer, schedule, ``generator``
    and ``data`` states, losses) is checkpointed every ``checkpoint_every`` steps and a later call
    resumes from it (the result equals an uninterrupted call's), saying where; the caller removes
    the checkpoint once the model is saved (``CheckpointStore(checkpoint).remove()``)."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)
    losses: list[float] = []
    start = 0
    store = CheckpointStore(checkpoint) if checkpoint is not None else None
    if store is not None:
        loaded = store.load()
        if loaded is not None:
            state, _ = loaded
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            generator.set_state(state["generator"])
            data.set_state(state["data"])
            losses = list(state["losses"])
            start = int(state["step"])
            announce("resuming pretraining at step %d of %d (%s)", start, steps, store.path)
            if progress is not None:
                progress.update(start)
    for step in range(start, steps):
        x_t, t, z = noised(data(batch), ab, generator)
        loss = denoising_loss(model(x_t, t), z).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite pretraining loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
        pause_point("pretrain-step")
        if store is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            store.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "generator": generator.get_state(), "data": data.state(), "losses": losses,
                        "step": step + 1})
    if losses:
        log.info("pretrained %d steps, final loss %.4f", steps, float(np.mean(losses[-50:])))
    return losses


def save_model(path: str | Path, model: EpsMLP, meta: dict | None = None) -> None:
    """Architecture config + weights (+ metadata such as the training data), written atomically."""
    atomic_torch_save({"config": model.config, "state_dict": model.state_dict(), "meta": meta or {}}, path)


def load_model(path: str | Path) -> tuple[EpsMLP, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = EpsMLP(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt.get("meta", {})
