"""CLIP score from a *local* CLIP folder, end to end through torchmetrics, on a tiny CLIP built
from config (random weights; no CLIP can be downloaded here) against ``100 cos(E_image, E_text)``
computed directly with transformers."""

import numpy as np
import pytest
import torch

from scale.builders import build_word_tokenizer
from scale.evaluate import clip_score

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    words = "a photo of the digit 0 1 2 3 4 5 6 7 8 9".split()
    tok = build_word_tokenizer(words, model_max_length=16)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path, model, proc


def test_clip_score_from_a_local_folder_matches_its_definition(tiny_clip):
    """Per image (one call each) the score is ``max(100 cos, 0)``; for a batch torchmetrics clamps
    the *mean*, ``max(mean 100 cos, 0)`` (scale.evaluate.clip_score's docstring)."""
    path, model, proc = tiny_clip
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 8, 8, 1), generator=g, dtype=torch.uint8)  # (N, H, W, C) like samples
    prompts = [f"a photo of the digit {i}" for i in range(6)]
    rgb = images.permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    with torch.no_grad():
        inp = proc(text=prompts, images=list(rgb), return_tensors="pt", padding=True)
        e_img = model.get_image_features(pixel_values=inp["pixel_values"])
        e_txt = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
    e_img = getattr(e_img, "pooler_output", e_img)
    e_txt = getattr(e_txt, "pooler_output", e_txt)
    cos = torch.nn.functional.cosine_similarity(e_img, e_txt, dim=-1).double()
    assert (cos > 0).any() and (cos < 0).any()  # both branches of the clamp are exercised
    per_image = [clip_score(images[i:i + 1], prompts[i:i + 1], str(path)) for i in range(6)]
    np.testing.assert_allclose(per_image, (100 * cos).clamp_min(0).numpy(), rtol=1e-4, atol=1e-3)
    batch = clip_score(images, prompts, str(path))
    assert batch == pytest.approx(max(float((100 * cos).mean()), 0.0), rel=1e-4, abs=1e-3)


def test_clip_score_refuses_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="not a local folder"):
        clip_score(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), ["x"], str(tmp_path / "nope"))
