"""Seeds derived from one run seed and a purpose, so that every random stream of a run is named
and a rerun (or a resumed run) with the same seed reproduces it exactly."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed from ``sha256(f"{seed}:{purpose}")``: independent streams per purpose."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:4], "little")


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, purpose)``."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose))
