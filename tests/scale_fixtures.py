"""Tiny diffusers models built from config and saved to disk, shared by the scale tests (CPU, seconds)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from scale import builders
from scale.engine import TrainConfig, load_checkpoint


PROMPT3 = "a photo of the digit 3"


T = 50


@pytest.fixture(scope="module")
def concept_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "concept"
    tok = builders.build_word_tokenizer("a photo of the digit 0 1 2 3 4 5 6 7 8 9".split())
    te = builders.build_text_encoder(len(tok.get_vocab()), seed=1)
    unet = builders.build_cond_unet(seed=2)
    # make the prompts matter for the random UNet: scale up the cross-attention output weights
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "attn2.to_out.0.weight" in n:
                p.mul_(20.0)
    builders.save_concept_pipeline(path, unet, te, tok, builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4))
    return str(path)


def tiny_ddpm_folder(root, n_images: int = 12, image_seed: int = 0):
    """A tiny DDPM saved in ``root/model`` and ``n_images`` random 8x8 grey PNGs in ``root/imgs``."""
    from PIL import Image

    builders.save_ddpm(root / "model", builders.build_uncond_unet(seed=3),
                       builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4))
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(image_seed)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(imgs / f"{i:03d}.png")
    return str(root / "model"), imgs, root


@pytest.fixture(scope="module")
def ddpm_setup(tmp_path_factory):
    model, imgs, root = tiny_ddpm_folder(tmp_path_factory.mktemp("ddpm"))
    return model, str(imgs), root


def concept_cfg(path, out, **kw):
    from scale.concept import ConceptConfig

    train = TrainConfig(**{**dict(steps=3, batch_size=4, micro_batch=4, lr=1e-2, cpu=True, seed=0),
                           **kw.pop("train", {})})
    base = dict(model=path, out=str(out), method="reverse_kl", concepts=(PROMPT3,), budgets=(5.0,), lr_dual=0.01,
                sample_steps=4, dual_only_steps=2)
    return ConceptConfig(**{**base, **kw}, train=train)


def data_cfg(model, imgs, out, **kw):
    from scale.data import DataConfig

    train = TrainConfig(**{**dict(steps=3, batch_size=4, micro_batch=8, lr=1e-3, cpu=True, seed=0),
                           **kw.pop("train", {})})
    base = dict(model=model, out=str(out), method="forward_kl", train_dir=imgs, forget=("003.png", "007.png"),
                budget_factor=1.5, lr_dual=0.5, forget_draws=2)
    return DataConfig(**{**base, **kw}, train=train)


def assert_resumed_equals_full(full: dict, resumed: dict, tmp_path) -> tuple[dict, dict]:
    """A resumed run (``tmp_path/cut``) equals the uninterrupted one (``tmp_path/full``) exactly:
    multipliers and every trained weight; returns both checkpoints' states."""
    torch.testing.assert_close(torch.as_tensor(resumed["lam"]), torch.as_tensor(full["lam"]), rtol=0, atol=0)
    wa, sa = load_checkpoint(tmp_path / "full" / "checkpoint")
    wb, sb = load_checkpoint(tmp_path / "cut" / "checkpoint")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    return sa, sb


RETAIN = ("a photo of the digit 5", "a photo of the digit 7")
