"""Streaming training images (``scale.data.TrainingImages``): memory grows with the batch, not with
the number of images; what a step sees is a function of its indices alone, so runs resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scale import builders
from scale.engine import TrainConfig, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
IMAGE_BYTES_F32 = 256 * 256 * 3 * 4  # one 256x256 RGB image as float32

_PEAK_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from scale.data import TrainingImages, list_images, load_images

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

folder, n, batch, mode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
files = list_images(folder)[:n]
TrainingImages(files[:1], (3, 256, 256), workers=2).load(torch.zeros(batch, dtype=torch.long))  # warm up
before = hwm_kib()
if mode == "stream":
    imgs = TrainingImages(files, (3, 256, 256), workers=2)
    total = 0.0
    for i in range(0, n, batch):
        total += float(imgs.load(torch.arange(i, min(i + batch, n))).mean())
else:  # everything stacked in memory at once (what the loader did before streaming)
    total = float(load_images(files, (3, 256, 256)).mean())
print(json.dumps({"n": n, "growth_mib": (hwm_kib() - before) / 1024, "mean": total}))
"""


def peak_growth_mib(folder: Path, n: int, batch: int = 16, mode: str = "stream") -> float:
    """Peak resident memory (VmHWM) added by reading the first ``n`` images of ``folder`` in batches
    of ``batch``, in a fresh process (MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(folder), str(n), str(batch), mode],
                       capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["growth_mib"]


def make_image_folder(folder: Path, n: int) -> Path:
    """``n`` 256x256 RGB PNGs (one random image, hard-linked: creating them costs nothing)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "00000.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(first)
    for i in range(1, n):
        os.link(first, folder / f"{i:05d}.png")
    return folder


def test_streamed_loading_grows_peak_memory_with_the_batch_not_the_number_of_images(tmp_path):
    """Reading 2,000 vs 200 images of 256x256 in batches of 16: holding them all would add at
    least 1,800 x 0.75 MiB = 1,318 MiB (one float32 copy); streaming may add at most a tenth of
    that (batches, decoder buffers, allocator noise)."""
    folder = make_image_folder(tmp_path / "imgs", 2000)
    small, large = peak_growth_mib(folder, 200), peak_growth_mib(folder, 2000)
    o_n = 1800 * IMAGE_BYTES_F32 / 2 ** 20
    assert large - small < 0.1 * o_n, (small, large)
    assert large < 0.1 * 2000 * IMAGE_BYTES_F32 / 2 ** 20, (small, large)


def test_streamed_batches_equal_the_decoded_images_in_draw_order(tmp_path):
    """``TrainingImages.load`` with worker threads returns exactly ``uint8 / 127.5 - 1`` of the drawn
    files, in the order drawn (repeats included)."""
    from PIL import Image

    from scale.data import TrainingImages, list_images

    rng = np.random.default_rng(3)
    arrs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(9)]
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    imgs = TrainingImages(list_images(tmp_path), (3, 8, 8), workers=4)
    idx = torch.tensor([5, 0, 5, 8, 2, 2, 7])
    want = torch.stack([torch.tensor(arrs[i], dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1 for i in idx])
    torch.testing.assert_close(imgs.load(idx), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="model expects"):
        TrainingImages(list_images(tmp_path), (1, 8, 8))


@pytest.mark.parametrize("method,form", [("forward_kl", "published"), ("siss", "published"), ("siss_is", "published"),
                                         ("siss_is", "project")])
def test_interrupted_and_resumed_streamed_run_equals_uninterrupted(tmp_path, method, form):
    """Killed after one step (checkpoint every step), resumed: multipliers and every weight equal the
    uninterrupted run's bit for bit, with images streamed by worker threads (published SISS also
    recomputes its NegGrad scale at the resumed step)."""
    from PIL import Image

    from scale.data import DataConfig, run

    builders.save_ddpm(tmp_path / "model", builders.build_uncond_unet(seed=3),
                       builders.build_scheduler(50, beta_start=2e-3, beta_end=0.4))
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i:03d}.png")

    def cfg(out):
        return DataConfig(model=str(tmp_path / "model"), out=str(tmp_path / out), method=method, siss_form=form,
                          train_dir=str(tmp_path / "imgs"), forget=("002.png", "006.png"), budget_factor=1.5,
                          lr_dual=0.5, siss_scaling_norm=0.5, data_workers=3,
                          train=TrainConfig(steps=3, batch_size=4, micro_batch=2, lr=1e-3, cpu=True,
                                            checkpoint_every=1))

    full = run(cfg("full"))
    run(cfg("cut"), stop_after=1)
    resumed = run(cfg("cut"), resume=True)
    torch.testing.assert_close(torch.as_tensor(resumed["lam"]), torch.as_tensor(full["lam"]), rtol=0, atol=0)
    wa, _ = load_checkpoint(tmp_path / "full" / "checkpoint")
    wb, _ = load_checkpoint(tmp_path / "cut" / "checkpoint")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
