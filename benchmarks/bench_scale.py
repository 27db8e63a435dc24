"""Step time, images/s and peak memory of the scale tier's steps on the real architectures with
random weights (no download): the SD v1 UNet (latents 64x64 at ``--size full``) and the CelebA-HQ
256 DDPM UNet (``google/ddpm-celebahq-256``'s config). On CPU use ``--size tiny`` (same block
structure, narrow channels, small images).

Rows, all in one run and on the same device:
- SD ``plain``: a diffusers LoRA fine-tuning step (denoising loss on random latents and a prompt;
  accumulated over ``--micro-batch`` chunks like the engine's steps);
- SD ``esd``: ESD-x (RU at a fixed multiplier) through ``scale.concept.run``, on RU's states (the
  on-policy ancestral chains, ``esd_sampler="ancestral"``: the same draws and forwards as RU);
- SD ``esd_published``: ESD with its published states (DDIM with classifier-free guidance 3 on 50
  steps, stopped at a random step, ``esd_sampler="ddim_cfg"``, the concept runs' default): up to 100
  more UNet forwards per step;
- SD ``reverse_kl``: RU primal-dual through ``scale.concept.run`` (same step + KL estimate + dual step);
- DDPM ``plain``: full fine-tuning step; ``siss``: FU at a fixed weight (SISS, project form);
  ``forward_kl``: FU primal-dual; ``siss_published``: SISS as published (keep set, NegGrad rescaled: one
  extra forward/backward of the forget half per step for the gradient norm).
Each row runs in its own subprocess so that its peak memory (CUDA max allocated, or the process's
max RSS on CPU) is its own. Step times are medians over the timed steps (``step_seconds`` in
``metrics.jsonl`` for the engine's rows). The dual machinery's overhead is ``reverse_kl`` vs ``esd``
and ``forward_kl`` vs ``siss`` (same draws, same forwards); on a busy machine whole-step differences are noise
of several percent, so the engine also times its dual part directly (``dual_seconds``: all-reduce
of the estimates, projected ascent, rank-agreement check), shown in the last column.

    python benchmarks/bench_scale.py --size tiny --steps 8
    python benchmarks/bench_scale.py --size full --batch 8 --mixed-precision bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD = {
    "full": dict(sample_size=64, channels=4, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 layers_per_block=2, attention_head_dim=8, norm_num_groups=32, text_hidden=768),
    "tiny": dict(sample_size=16, channels=4, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64,
                 layers_per_block=2, attention_head_dim=8, norm_num_groups=32, text_hidden=64),
}
DDPM = {
    "full": dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512)),
    "tiny": dict(sample_size=32, block_out_channels=(32, 32, 32, 32, 64, 64)),
}


def build_sd(path: Path, size: str) -> None:
    """``full``: SD v1.x's published UNet, CLIP-L-shaped text encoder and noise schedule
    (``scale.builders.build_sd_v1_*``); ``tiny``: the same block structure at narrow widths."""
    from scale import builders

    tok = builders.build_word_tokenizer("a photo of a cat dog".split(), model_max_length=77)
    if size == "full":
        te = builders.build_sd_v1_text_encoder(len(tok.get_vocab()))
        unet = builders.build_sd_v1_unet(SD["full"]["sample_size"])
        builders.save_concept_pipeline(path, unet, te, tok, builders.build_sd_v1_scheduler())
        return
    c = dict(SD[size])
    hidden = c.pop("text_hidden")
    te = builders.build_text_encoder(len(tok.get_vocab()), hidden=hidden, layers=2, heads=8, max_positions=77)
    unet = builders.build_cond_unet(**c)
    builders.save_concept_pipeline(path, unet, te, tok, builders.build_scheduler(1000, "scaled_linear", 0.00085, 0.012))


def build_ddpm(path: Path, size: str, n_images: int = 16) -> None:
    """``google/ddpm-celebahq-256``'s UNet config (``freq_shift=1``, ``flip_sin_to_cos=False``,
    ``norm_eps=1e-6``, ``downsample_padding=0``, ``attention_head_dim=None``) and scheduler
    (fixed_small, clip_sample); ``tiny`` narrows the widths and the image size only."""
    import numpy as np
    from PIL import Image

    from scale import builders

    c = DDPM[size]
    unet = builders.build_celebahq_ddpm_unet(c["sample_size"], block_out_channels=c["block_out_channels"])
    builders.save_ddpm(path / "model", unet, builders.build_celebahq_scheduler())
    (path / "imgs").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    s = c["sample_size"]
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(path / "imgs" / f"{i:03d}.png")


def _peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def plain_step_times(kind: str, path: Path, args) -> list[float]:
    """The plain diffusers fine-tuning step on the same prepared model, trainable set and batch."""
    import torch

    from toy.core.diffusion import add_noise
    from scale.engine import TrainConfig, make_accelerator
    from scale.models import Trainable, encode_prompts, load_concept_models, load_ddpm_models
    from toy.core.objectives import denoising_loss

    acc = make_accelerator(TrainConfig(mixed_precision=args.mixed_precision, cpu=args.device == "cpu"))
    g = torch.Generator().manual_seed(0)
    if kind == "sd":
        m = load_concept_models(str(path))
        tr = Trainable(m.unet, "lora", rank=4)
        emb = encode_prompts(m.tokenizer, m.text_encoder, ["a photo of a cat"]).to(acc.device)
    else:
        m = load_ddpm_models(str(path / "model"))
        tr = Trainable(m.unet, "full")
    m.unet.to(acc.device)
    opt = torch.optim.Adam(tr.parameters(), lr=1e-5)
    model, opt = acc.prepare(m.unet, opt)
    ab = m.alphas_cumprod
    B = args.batch
    mb = args.micro_batch or B  # gradient accumulation over micro-batches, as the engine does
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for start in range(0, B, mb):
            b = min(mb, B - start)
            x0 = torch.randn((b, *m.sample_shape), generator=g).to(acc.device)
            noise = torch.randn((b, *m.sample_shape), generator=g).to(acc.device)
            t = torch.randint(0, ab.numel(), (b,), generator=g)
            x_t = add_noise(x0, noise, ab[t].to(acc.device))
            with acc.autocast():
                if kind == "sd":
                    eps = model(x_t, t.to(acc.device), encoder_hidden_states=emb.expand(b, -1, -1)).sample
                else:
                    eps = model(x_t, t.to(acc.device)).sample
            acc.backward(denoising_loss(eps, noise).mean() * (b / B))
        opt.step()
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


def engine_step_times(kind: str, method: str, path: Path, out: Path, args) -> list[float]:
    from scale import figures
    from scale.engine import TrainConfig

    train = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, micro_batch=args.micro_batch or args.batch,
                        lr=1e-5, mixed_precision=args.mixed_precision, cpu=args.device == "cpu",
                        checkpoint_every=10 ** 9)
    from toy.core.runs import clear_run_dir

    clear_run_dir(out)  # each measurement is a fresh run (the settings differ between calls)
    if kind == "sd":
        from scale.concept import ConceptConfig, run

        with figures.disabled():  # the benchmark times steps; no sample grids
            # the baseline ESD draws RU's states (the same on-policy ancestral chains), so that
            # reverse_kl vs esd isolates the dual machinery; esd_published: ESD's own DDIM + CFG states
            sampler = "ddim_cfg" if method == "esd_published" else "ancestral"
            run(ConceptConfig(model=str(path), out=str(out), method=method.replace("_published", ""),
                              concepts=("a photo of a cat",), budgets=(1.0,), sample_steps=args.sample_steps,
                              esd_sampler=sampler, train=train))
    else:
        from scale.data import DataConfig, run

        form = "published" if method == "siss_published" else "project"
        with figures.disabled():
            run(DataConfig(model=str(path / "model"), out=str(out), method=method.replace("_published", ""),
                           siss_form=form, train_dir=str(path / "imgs"), forget=("000.png", "001.png"),
                           budget_factor=1.5, forget_draws=1, train=train))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    return [r["step_seconds"] for r in rows], [r["dual_seconds"] for r in rows]


def child(args) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = Path(args.workdir) / args.kind
    dual = None
    if args.method == "plain":
        times = plain_step_times(args.kind, path, args)
    else:
        times, dual = engine_step_times(args.kind, args.method, path,
                                        Path(args.workdir) / f"run_{args.kind}_{args.method}", args)
    print(json.dumps({"median_s": _median(times), "times": times, "peak_mb": _peak_mb(args.device),
                      "dual_s": None if dual is None else _median(dual)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=0)
    p.add_argument("--sample-steps", type=int, default=4, help="on-policy sampler steps of ESD/RU")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--only", choices=("sd", "ddpm", "both"), default="both")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON line (tests/test_scale_gpu.py)")
    p.add_argument("--child", nargs=2, metavar=("KIND", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and args.size == "full":
        print("warning: --size full on CPU takes very long; use --size tiny", file=sys.stderr)
    if args.child:
        args.kind, args.method = args.child
        child(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as wd:
        wd = Path(wd)
        plan = []
        if args.only in ("sd", "both"):
            build_sd(wd / "sd", args.size)
            plan += [("sd", "plain"), ("sd", "esd"), ("sd", "reverse_kl"), ("sd", "esd_published")]
        if args.only in ("ddpm", "both"):
            (wd / "ddpm").mkdir()
            build_ddpm(wd / "ddpm", args.size)
            plan += [("ddpm", "plain"), ("ddpm", "siss"), ("ddpm", "forward_kl"), ("ddpm", "siss_published")]
        passthrough = [f"--size={args.size}", f"--steps={args.steps}", f"--warmup={args.warmup}",
                       f"--batch={args.batch}", f"--micro-batch={args.micro_batch}",
                       f"--sample-steps={args.sample_steps}", f"--mixed-precision={args.mixed_precision}"]
        for kind, method in plan:
            res = subprocess.run([sys.executable, __file__, "--child", kind, method, "--workdir", str(wd), *passthrough],
                                 capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                return 1
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append((kind, method, r))
    base = {"sd": "esd", "ddpm": "siss"}
    ref = {(k, m): r["median_s"] for k, m, r in rows}
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} thread(s))"
    print(f"device: {dev}; size={args.size}; batch={args.batch}; mixed_precision={args.mixed_precision}; "
          f"timed steps={args.steps} after {args.warmup} warm-up")
    print("| model | step | median step (s) | images/s | peak memory (MiB) | vs baseline step | "
          "dual machinery (ms, % of step) |")
    print("|---|---|---|---|---|---|---|")
    for kind, method, r in rows:
        b = ref.get((kind, base[kind]))
        rel = "" if method == "plain" or b is None else f"{100 * (r['median_s'] / b - 1):+.1f}%"
        dual = "" if r["dual_s"] is None else f"{1000 * r['dual_s']:.2f} ({100 * r['dual_s'] / r['median_s']:.2f}%)"
        print(f"| {kind} | {method} | {r['median_s']:.4f} | {args.batch / r['median_s']:.2f} | {r['peak_mb']:.0f} | "
              f"{rel} | {dual} |")
    if args.json:
        print(json.dumps([{"model": k, "step": m, "median_s": r["median_s"], "images_per_s": args.batch / r["median_s"],
                           "peak_mb": r["peak_mb"],
                           "dual_fraction": None if r["dual_s"] is None else r["dual_s"] / r["median_s"]}
                          for k, m, r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
