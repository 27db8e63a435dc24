"""The published architectures at their real width, on CPU (marker ``realsize``, run after the
default suite): Stable Diffusion v1.x's UNet (859.5 M parameters, latents 16x16 instead of 64x64:
every weight shape is the real one) with a 768-wide CLIP text encoder, and
``google/ddpm-celebahq-256``'s UNet (113.7 M parameters, its config: ``freq_shift=1``,
``flip_sin_to_cos=False``, ``norm_eps=1e-6``, ``downsample_padding=0``, ``attention_head_dim=None``,
self-attention in the fifth down block) at 32 px, random weights. Each is saved in the diffusers
layout, reloaded through ``scale.models``' loaders by ``scale.concept.run`` / ``scale.data.run``,
and every method takes one optimizer step in fp32 and under bf16 autocast.

    pytest -m realsize tests/test_scale_realsize.py
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scale import builders
from scale.engine import TrainConfig

pytestmark = pytest.mark.realsize

CAT = "a photo of a cat"
PRECISIONS = ("no", "bf16")


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "sd_v1"
    tok = builders.build_word_tokenizer("a photo of cat dog".split(), model_max_length=77)
    te = builders.build_sd_v1_text_encoder(len(tok.get_vocab()), layers=1, seed=1)
    unet = builders.build_sd_v1_unet(sample_size=16, seed=2)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    builders.save_concept_pipeline(path, unet, te, tok, builders.build_sd_v1_scheduler())
    del unet
    return str(path)


@pytest.fixture(scope="module")
def ddpm_setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("celebahq")
    unet = builders.build_celebahq_ddpm_unet(sample_size=32, seed=3)
    assert sum(p.numel() for p in unet.parameters()) == 113_673_219
    builders.save_ddpm(root / "model", unet, builders.build_celebahq_scheduler())
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "imgs" / f"{i:03d}.png")
    return str(root / "model"), str(root / "imgs")


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_finite(out, primal: bool = True):
    rows = _rows(out)
    assert rows
    for r in rows:
        assert all(math.isfinite(v) for v in r["lam"]), r
        assert all(math.isfinite(v) for v in r["measured"]), r
        if primal and r["primal"]:
            assert math.isfinite(r["loss"]), r


def test_sd_v1_loads_with_its_real_config_and_lora_attaches_to_the_64_attn2_projections(sd_path):
    from scale.models import Trainable, load_concept_models

    m = load_concept_models(sd_path)
    assert m.unet.config.cross_attention_dim == m.text_encoder.config.hidden_size == 768
    assert tuple(m.unet.config.block_out_channels) == (320, 640, 1280, 1280)
    Trainable(m.unet, "lora", rank=4)
    lora = [n for n, mod in m.unet.named_modules() if hasattr(mod, "lora_A")]
    assert len(lora) == 64 and all(".attn2." in n for n in lora)
    assert {n.rsplit(".attn2.", 1)[1] for n in lora} == {"to_q", "to_k", "to_v", "to_out.0"}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", ["reverse_kl", "reverse_kl_dual_only", "esd", "likelihood"])
def test_sd_v1_one_step_of_every_concept_method(sd_path, tmp_path, method, precision):
    from safetensors.torch import load_file

    from scale.concept import ConceptConfig, run

    out = tmp_path / method
    cfg = ConceptConfig(model=sd_path, out=str(out), method=method, concepts=(CAT,), budgets=(5.0,),
                        lr_dual=0.05, sample_steps=1, dual_only_steps=1, classifier_draws=1,
                        train=TrainConfig(steps=1 + (method == "reverse_kl_dual_only"), batch_size=1, micro_batch=1,
                                          lr=1e-4, cpu=True, mixed_precision=precision))
    s = run(cfg)
    _assert_finite(out)
    assert all(math.isfinite(float(v)) for v in torch.as_tensor(s["lam"]).reshape(-1))
    w = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    modules = {k.split(".lora_")[0] for k in w}
    assert len(modules) == 64 and all(".attn2." in k for k in modules)
    assert all(torch.all(torch.isfinite(v)) for v in w.values())


def test_celebahq_ddpm_loads_with_its_real_config(ddpm_setup):
    from scale.models import load_ddpm_models

    m = load_ddpm_models(ddpm_setup[0])
    c = m.unet.config
    assert (c.freq_shift, c.flip_sin_to_cos, c.norm_eps, c.downsample_padding, c.attention_head_dim) == \
        (1, False, 1e-6, 0, None)
    assert tuple(c.down_block_types)[4] == "AttnDownBlock2D"
    assert (m.scheduler.config.variance_type, m.scheduler.config.clip_sample) == ("fixed_small", True)


def test_celebahq_ddpm_refuses_lora_naming_trainable_full(ddpm_setup, tmp_path):
    from scale.data import DataConfig

    with pytest.raises(ValueError, match='trainable="full"'):
        DataConfig(model=ddpm_setup[0], out=str(tmp_path), train_dir=ddpm_setup[1], forget=("001.png",),
                   budget_factor=1.5, trainable="lora")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method,form", [("forward_kl", "published"), ("siss", "published"), ("siss_is", "published"),
                                         ("siss", "project"), ("siss_is", "project")])
def test_celebahq_ddpm_one_step_of_every_data_method(ddpm_setup, tmp_path, method, form, precision):
    from scale.data import DataConfig, run

    model, imgs = ddpm_setup
    out = tmp_path / f"{method}_{form}"
    s = run(DataConfig(model=model, out=str(out), method=method, siss_form=form, train_dir=imgs,
                       forget=("001.png", "004.png"), budget_factor=1.5, forget_draws=1,
                       train=TrainConfig(steps=1, batch_size=2, micro_batch=2, lr=1e-5, cpu=True,
                                         mixed_precision=precision)))
    _assert_finite(out)
    assert np.all(np.isfinite(np.asarray(s["forget_loss_after"], dtype=float)))
    if method != "forward_kl" and form == "published":
        assert math.isfinite(s["neg_scale"]) and s["neg_scale"] > 0
