"""GPU checks (``pytest -m gpu``): the pre-flight on real-size random-initialised SD v1.x (64x64 latents)
and CelebA-HQ DDPM (256 px) at full resolution in bf16 and fp32, and the throughput comparisons of
``benchmarks/bench_scale.py`` against their targets. Skipped, with the reason, without CUDA.

Targets: the FU step in bf16 at micro-batch 32 reaches >= 90% of plain fine-tuning's images/s and
>= 5x the paper's setting (fp32, micro-batch 2 x 16 accumulation); the dual machinery is <= 5% of a
step; the ESD-style step at batch 8 has >= 6x the images/s of ESD's batch-1 loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")]


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import realsize_models as rm

    root = tmp_path_factory.mktemp("gpu")
    rm.build_sd_v1(root / "sd", sample_size=64)
    model, imgs = rm.build_celebahq_ddpm(root / "ddpm", sample_size=256, n_images=64)
    return root, rm, model, imgs


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_preflight_on_full_size_sd_v1(full_size, tmp_path, precision, capsys):
    from dualunlearn.cli import main

    root, rm, _, _ = full_size
    cfg = tmp_path / "sd.toml"
    cfg.write_text(rm.sd_config(root / "sd").replace('mixed_precision = "no"', f'mixed_precision = "{precision}"'))
    assert main(["scale", "calibrate", "--config", str(cfg), "--out", str(tmp_path / "cal")]) == 0
    cal = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    cfg.write_text(rm.sd_config(root / "sd", budget=cal["suggested_budgets"][0][1])
                   .replace('mixed_precision = "no"', f'mixed_precision = "{precision}"'))
    t0 = time.perf_counter()
    rc = main(["scale", "preflight", "--config", str(cfg), "--out", str(tmp_path / "pf")])
    out = capsys.readouterr().out
    print(out, f"\n{time.perf_counter() - t0:.1f} s")
    assert rc == 0, out


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_preflight_on_full_size_celebahq_ddpm(full_size, tmp_path, precision, capsys):
    from dualunlearn.cli import main

    root, rm, model, imgs = full_size
    cfg = tmp_path / "ddpm.toml"
    cfg.write_text(rm.ddpm_config(model, imgs).replace('mixed_precision = "no"', f'mixed_precision = "{precision}"'))
    rc = main(["scale", "preflight", "--config", str(cfg), "--out", str(tmp_path / "pf")])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out


def _bench(*args: str) -> dict[tuple[str, str], dict]:
    """Rows of ``bench_scale.py --json`` keyed by (model, step)."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--size", "full", "--steps", "10",
                          "--warmup", "2", "--json", *args], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    return {(r["model"], r["step"]): r for r in rows}


def test_forward_kl_bf16_throughput_targets():
    big = _bench("--only", "ddpm", "--batch", "32", "--mixed-precision", "bf16")
    paper = _bench("--only", "ddpm", "--batch", "32", "--micro-batch", "2", "--mixed-precision", "no")
    fu, plain = big[("ddpm", "forward_kl")]["images_per_s"], big[("ddpm", "plain")]["images_per_s"]
    assert fu >= 0.9 * plain, (fu, plain)
    assert fu >= 5 * paper[("ddpm", "forward_kl")]["images_per_s"], (fu, paper[("ddpm", "forward_kl")])
    assert big[("ddpm", "forward_kl")]["dual_fraction"] <= 0.05, big[("ddpm", "forward_kl")]


def test_esd_batched_step_throughput_and_dual_overhead():
    one = _bench("--only", "sd", "--batch", "1", "--mixed-precision", "bf16")
    eight = _bench("--only", "sd", "--batch", "8", "--mixed-precision", "bf16")
    assert eight[("sd", "esd")]["images_per_s"] >= 6 * one[("sd", "esd")]["images_per_s"], (eight, one)
    assert eight[("sd", "reverse_kl")]["dual_fraction"] <= 0.05, eight[("sd", "reverse_kl")]
