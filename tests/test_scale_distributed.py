"""Two real processes (torch.distributed.run, gloo on CPU, accelerate's MULTI_CPU) running the
``dualunlearn scale`` CLI: every rank holds the same multipliers after every dual step (the loop
also checks this itself at each step), and they match a one-process run with the same global batch.

``accelerate launch --cpu --num_processes 2`` starts a single process without mpirun, so the
torch launcher (what ``accelerate launch --multi_gpu`` uses underneath) starts the two processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scale import builders
from scale.engine import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int, timeout: int = 240) -> None:
    if nproc == 1:  # the one-process reference runs in this process (same CLI entry point)
        from dualunlearn.cli import main

        assert main(args) == 0
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", "-m", "dualunlearn.cli", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]


def _lam_rows(run: Path) -> np.ndarray:
    return np.array([json.loads(x)["lam"] for x in (run / "metrics.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("dist")
    sch = builders.build_scheduler(50, beta_start=2e-3, beta_end=0.4)
    builders.save_ddpm(root / "ddpm", builders.build_uncond_unet(seed=3), sch)
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "imgs" / f"{i:03d}.png")
    tok = builders.build_word_tokenizer("a photo of the digit 3 5".split())
    unet = builders.build_cond_unet(seed=2)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "attn2.to_out.0.weight" in n:
                p.mul_(20.0)
    builders.save_concept_pipeline(root / "concept", unet, builders.build_text_encoder(len(tok.get_vocab()), seed=1),
                                   tok, sch)
    return root


def _compare(one: Path, two: Path, model_weights: dict | None) -> None:
    ranks = [json.loads((two / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["dual_steps"] == ranks[1]["dual_steps"]
    assert ranks[0]["lam"] == ranks[1]["lam"]  # bit-identical across ranks
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    # same global batch, different float summation order (per-rank forwards, gloo all-reduce)
    np.testing.assert_allclose(_lam_rows(two), _lam_rows(one), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(ranks[0]["lam"], s1["lam"], rtol=1e-5, atol=1e-9)
    wa, _ = load_checkpoint(one / "checkpoint")
    wb, _ = load_checkpoint(two / "checkpoint")
    assert wa.keys() == wb.keys()
    for k in wa:
        ref = model_weights[k] if model_weights is not None and k in model_weights else torch.zeros_like(wa[k])
        upd_a, upd_b = wa[k] - ref, wb[k] - ref
        # float32 summation error of the updates, plus the rounding of w + update to float32
        bound = 1e-4 * upd_a.abs().max() + 4 * torch.finfo(torch.float32).eps * wa[k].abs()
        assert torch.all((upd_a - upd_b).abs() <= bound), k


def test_two_process_forward_kl_multipliers_match_across_ranks_and_one_process(setup, tmp_path):
    from diffusers import UNet2DModel

    common = ["--set", f'model="{setup / "ddpm"}"', "--set", f'train_dir="{setup / "imgs"}"',
              "--set", 'forget=["003.png","007.png"]', "--set", "budget_factor=1.5", "--set", "lr_dual=0.5",
              "--set", "train.steps=3", "--set", "train.batch_size=4", "--set", "train.micro_batch=2",
              "--set", "train.cpu=true", "--set", 'train.optimizer="sgd"', "--set", "train.lr=0.05"]
    _run(["scale", "data", "--out", str(tmp_path / "one"), *common], 1)
    _run(["scale", "data", "--out", str(tmp_path / "two"), *common], 2)
    w0 = {k: v.detach() for k, v in UNet2DModel.from_pretrained(setup / "ddpm").named_parameters()}
    _compare(tmp_path / "one", tmp_path / "two", w0)
    lam = _lam_rows(tmp_path / "two")
    assert np.all(lam > 0) and np.all(lam <= 1 / 12 + 1e-15)


def test_two_process_reverse_kl_lora_multipliers_match_across_ranks_and_one_process(setup, tmp_path):
    common = ["--set", f'model="{setup / "concept"}"', "--set", 'concepts=["a photo of the digit 3"]',
              "--set", "budgets=[1e6]", "--set", "lr_dual=1e-7", "--set", "sample_steps=4",
              "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.micro_batch=1",
              "--set", "train.cpu=true", "--set", 'train.optimizer="sgd"', "--set", "train.lr=0.5"]
    _run(["scale", "concept", "--out", str(tmp_path / "one"), *common], 1)
    _run(["scale", "concept", "--out", str(tmp_path / "two"), *common], 2)
    _compare(tmp_path / "one", tmp_path / "two", None)  # LoRA: B starts at 0, A at seeded values
    assert np.all(_lam_rows(tmp_path / "two") > 0)
