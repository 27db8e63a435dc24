"""scikit-learn's 8x8 digits: the data, the digits classifier (accuracy of generated images, KID
features) and the pixel conversions shared by pretraining and evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from toy.core.seeding import derive_seed, seeded_generator

def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as (N, 1, 8, 8) float32 in [-1, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


class DigitClassifier(nn.Module):
    """MLP on 8x8 digits; ``features`` (64-d penultimate layer) feeds KID."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 64-d penultimate layer (before the class head)."""
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 1500) -> tuple[DigitClassifier, float]:
    """Train on 80% of the digits (with small Gaussian pixel noise, so that slightly imperfect
    generated digits are judged fairly); return the classifier and its held-out accuracy. Streams of
    ``seed``: ``classifier:data`` (the split, batches and pixel noise), ``classifier:init``."""
    g = seeded_generator(seed, "classifier:data")
    perm = torch.randperm(x.shape[0], generator=g)
    n_tr = int(0.8 * x.shape[0])
    tr, te = perm[:n_tr], perm[n_tr:]
    torch.manual_seed(derive_seed(seed, "classifier:init"))
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = tr[torch.randint(0, n_tr, (128,), generator=g)]
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
        loss = nn.functional.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(x[te]).argmax(1) == y[te]).float().mean())
    return clf, acc


class DigitFeatures(nn.Module):
    """The classifier's 64-d penultimate layer, L2-normalised: the KID feature network."""

    def __init__(self, clf: DigitClassifier):
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.clf.features(x), dim=1)


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Generated pixels quantised like the training PNGs (8 bit), in [-1, 1]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1.0


def write_png_folder(x: torch.Tensor, folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for a, name in zip(arr, names):
        Image.fromarray(a[0]).save(folder / name)
