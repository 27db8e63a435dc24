"""Loading diffusers models from disk (tiny ones built from config): the saved UNet reproduced, clear
errors on bad paths and prompts, the frozen reference without a second UNet, no downloads at
evaluation, latent pipelines with a VAE."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from scale import builders
from scale.models import Trainable, encode_prompts, load_concept_models, load_ddpm_models, resolve_model_location
from tests.scale_fixtures import PROMPT3, T, concept_cfg, concept_path


def test_loaded_concept_model_reproduces_the_saved_unet(concept_path):
    from diffusers import UNet2DConditionModel

    models = load_concept_models(concept_path)
    assert models.vae is None and models.sample_shape == (1, 8, 8)
    assert models.alphas_cumprod.numel() == T
    ref = UNet2DConditionModel.from_pretrained(concept_path, subfolder="unet")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    emb = encode_prompts(models.tokenizer, models.text_encoder, [PROMPT3, "a photo of the digit 5"])
    with torch.no_grad():
        torch.testing.assert_close(models.unet(x, t, encoder_hidden_states=emb).sample,
                                   ref(x, t, encoder_hidden_states=emb).sample)


def test_missing_or_non_diffusers_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_location(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model"):
        load_ddpm_models(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a diffusers model"):
        load_concept_models(str(tmp_path / "empty"))


def test_prompt_that_tokenizes_to_nothing_fails_before_training(concept_path, tmp_path):
    from scale.concept import run

    with pytest.raises(ValueError, match="tokenizes to nothing"):
        run(concept_cfg(concept_path, tmp_path / "r", concepts=("zzz qqq",)))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.parametrize("mode", ["lora", "attn2"])
def test_reference_context_is_the_pretrained_unet_without_a_copy(concept_path, mode):
    models = load_concept_models(concept_path)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 30])
    emb = encode_prompts(models.tokenizer, models.text_encoder, [PROMPT3] * 2)
    with torch.no_grad():
        before = models.unet(x, t, encoder_hidden_states=emb).sample
    n_params = sum(p.numel() for p in models.unet.parameters())
    tr = Trainable(models.unet, mode, rank=2)
    assert tr.names and all(".attn2." in n for n in tr.names)
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        after = models.unet(x, t, encoder_hidden_states=emb).sample
        with tr.reference() as ref:
            again = ref(x, t, encoder_hidden_states=emb).sample
        after2 = models.unet(x, t, encoder_hidden_states=emb).sample
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(again, before)
    torch.testing.assert_close(after2, after)
    kept = sum(v.numel() for v in tr._originals.values())
    assert kept < 0.5 * n_params  # only the cross-attention tensors are kept, never a second UNet


def test_evaluation_never_downloads_missing_weights(tmp_path):
    from scale.evaluate import clip_score, load_feature_extractor

    with pytest.raises(ValueError, match="not available locally"):
        load_feature_extractor("inception:" + str(tmp_path / "pt_inception.pth"))
    with pytest.raises(ValueError, match="cannot be downloaded"):
        clip_score(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), ["x"], "openai/clip-vit-base-patch16")


def test_latent_pipeline_with_vae_loads_unlearns_and_decodes_samples(tmp_path):
    """The SD layout with a VAE: training runs on latents (no decoding), sampling decodes."""
    from diffusers import AutoencoderKL

    from dualunlearn.cli import main
    from scale.concept import run

    tok = builders.build_word_tokenizer("a photo of cat dog".split())
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    unet = builders.build_cond_unet(sample_size=8, channels=4, seed=5)
    builders.save_concept_pipeline(tmp_path / "sd", unet, builders.build_text_encoder(len(tok.get_vocab())), tok,
                                   builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4), vae=vae)
    models = load_concept_models(str(tmp_path / "sd"))
    assert models.vae is not None and models.sample_shape == (4, 8, 8)
    s = run(concept_cfg(str(tmp_path / "sd"), tmp_path / "run", method="esd", concepts=("a photo of a cat",),
                         train={"steps": 1}))
    assert s["method"] == "esd"
    assert main(["scale", "sample", "--out", str(tmp_path / "smp"), "--set", f'model="{tmp_path / "sd"}"',
                 "--set", f'run="{tmp_path / "run"}"', "--set", 'prompts=["a photo of a cat"]',
                 "--set", "num_per_prompt=2", "--set", "num_steps=3", "--set", "guidance=2.0", "--set", "cpu=true"]) == 0
    imgs = np.load(tmp_path / "smp" / "samples.npz")["images"]
    assert imgs.shape == (2, 16, 16, 3)
