"""The training loop (``scale.engine``): gradient accumulation equals one big micro-batch."""

from __future__ import annotations


import torch

from scale.engine import load_checkpoint
from tests.scale_fixtures import data_cfg, ddpm_setup


def test_gradient_accumulation_matches_one_big_micro_batch(ddpm_setup, tmp_path):
    """Three micro-batches accumulated == one micro-batch of the same global batch. SGD keeps the
    update linear in the gradient (Adam's first steps are ~lr*sign(g), which turns float32
    summation-order noise in near-zero gradient entries into O(lr) differences); the bound on the
    updates is float32 summation error (~1e-6 relative) with margin over 3 steps."""
    from diffusers import UNet2DModel

    from scale.data import run

    model, imgs, _ = ddpm_setup
    sgd = {"optimizer": "sgd", "lr": 0.05}
    one = run(data_cfg(model, imgs, tmp_path / "one", train={"micro_batch": 8, **sgd}))
    acc = run(data_cfg(model, imgs, tmp_path / "acc", train={"micro_batch": 3, **sgd}))  # 3 micro-batches
    torch.testing.assert_close(torch.as_tensor(acc["lam"]), torch.as_tensor(one["lam"]), rtol=1e-5, atol=1e-9)
    w0 = dict(UNet2DModel.from_pretrained(model).named_parameters())
    wa, _ = load_checkpoint(tmp_path / "one" / "checkpoint")
    wb, _ = load_checkpoint(tmp_path / "acc" / "checkpoint")
    for k in wa:
        upd_a, upd_b = wa[k] - w0[k].detach(), wb[k] - w0[k].detach()
        # float32 summation error of the updates, plus the rounding of w + update to float32
        bound = 1e-4 * upd_a.abs().max() + 4 * torch.finfo(torch.float32).eps * wa[k].abs()
        assert torch.all((upd_a - upd_b).abs() <= bound), k
