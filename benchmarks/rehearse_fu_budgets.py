"""The measurements behind the FU budgets of the offline rehearsal's data unlearning (docs/scale.md,
"Data unlearning (FU, SISS): the budgets"), on the rehearsal's own pretrained DDPM and data.

0. ``old``: FU with the old rule and settings (``budget_factor = 1.15`` in ``scale.data.run``, 150
   steps at lr 2.5e-4, 4 constraint draws per image per step, dual step 1 on the ``n*lam`` scale): its
   final ``n*lam`` and the paired rise of the forget losses.
1. ``noise``: the old budget (``1.15 x`` a 16-random-draw loss estimate, as ``scale.data.run`` made it
   with ``budget_factor = 1.15``) against a 512-draw loss per forget image; the standard deviation of
   one draw of the denoising loss relative to its mean, and of the per-step constraint estimate
   (the mean of 4 draws, and of 16).
2. ``retrain``: mean loss on the training images and on 256 unseen digits under the pretrained model
   (and the memorisation gap ``G`` as the rehearsal computes it); the DDPM retrained from scratch
   without the forget images (``pretrain_ddpm``, the same recipe, at the named streams
   ``retrain-without-forget:<k>`` of the seed) and its forget and retained losses.
3. ``edge``: fine-tuning at the edge of the dual domain (``n*lam_i = 1`` for every forget image:
   SISS in the project form at weight 1, i.e. training on the retained images only) through
   ``scale.data.run``: the rise of the forget losses after 150 steps at lr 2.5e-4, after 300, and after
   150 at lr 1e-3; the retained loss's relative rise after 50 steps at lr 1e-3 (the lr is constant and
   every step's draws depend on the step only, so a 50-step run is the first 50 steps of the longer one).
4. ``fraction``: budgets at gap fraction 0.25 (``forward_kl_budgets``) against the edge after 150
   steps at lr 5e-4 (and after the rehearsal's 200).

Forget losses are on the rehearsal's paired systematic draws (``paired_forget_losses``, 500 per image),
retained losses on its 64 fixed draws per image (``evaluate_ddpm``'s stream), so before/after
differences are paired; ``+-`` is one standard error. The pretrained DDPM is the rehearsal's: the
script first runs the rehearsal's data part (``scale.rehearse.runner.run`` with ``methods=["siss"]``)
into ``--out``, which reuses ``<out>/pretrained`` when its fingerprint matches. About 2 minutes on one
CPU thread at the tiny size::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/rehearse_fu_budgets.py [--out runs/rehearse-fu-budgets]
        [--size tiny] [--seed 0] [--parts old,noise,retrain,edge,fraction] [--retrain-seeds 2]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from scale import data
from scale.engine import TrainConfig
from scale.models import load_ddpm_models
from scale.rehearse import runner
from scale.rehearse.config import RehearseConfig
from scale.rehearse.digits import load_digits_tensor, to_pixels
from scale.rehearse.evaluation import fixed_draw_losses, forward_kl_budgets, paired_forget_losses
from scale.rehearse.pretrain import pretrain_ddpm
from scale.sample import load_unlearned_unet
from toy.core.runs import clear_run_dir
from toy.core.seeding import derive_seed, seeded_generator

PARTS = ("old", "noise", "retrain", "edge", "fraction")


def fmt(v, d: int = 3) -> str:
    return ", ".join(f"{float(a):.{d}f}" for a in np.atleast_1d(np.asarray(v, dtype=np.float64)))


class Setup:
    """The rehearsal's pretrained DDPM, its training subset (forget, retained), held-out digits and
    training-image folder, and the pretrained model's paired losses."""

    def __init__(self, cfg: RehearseConfig):
        self.cfg = cfg
        t0 = time.time()
        self.rehearsal = runner.run(replace(cfg, methods=("siss",)))
        self.rehearsal_s = time.time() - t0
        out, pre = Path(cfg.out), cfg.preset
        x, _ = load_digits_tensor()
        perm = torch.randperm(x.shape[0], generator=seeded_generator(cfg.seed, "ddpm:training-subset"))
        sub, held = perm[:pre["data_train_size"]], perm[pre["data_train_size"]:pre["data_train_size"] + 256]
        x_sub = to_pixels(x[sub])
        self.x_train = x_sub
        self.x_forget, self.x_retain = x_sub[:cfg.data_forget_images], x_sub[cfg.data_forget_images:]
        self.x_heldout = to_pixels(x[held])
        self.names = [f"digit_{int(i):04d}.png" for i in sub]
        self.model_dir = out / "pretrained" / "ddpm"
        self.train_dir = out / "digits_train"
        self.dm = load_ddpm_models(str(self.model_dir))
        self.ab = self.dm.alphas_cumprod
        self.mem = self.rehearsal["memorisation"]
        self.G = self.mem["gap"]
        self.l_pre = self.forget_draws(self.dm.unet)
        self.r_pre = self.retain_loss(self.dm.unet)

    def forget_draws(self, unet) -> torch.Tensor:
        return paired_forget_losses(unet, self.x_forget, self.ab, self.cfg).double()

    def retain_loss(self, unet) -> float:
        return float(fixed_draw_losses(unet, self.x_retain, self.ab, 64,
                                       derive_seed(self.cfg.seed, "ddpm-eval:retain-loss")).double().mean())

    def paired(self, l_post: torch.Tensor, ref: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per-image mean of ``l_post - ref`` over the paired draws and its standard error."""
        d = l_post - ref
        return d.mean(0).numpy(), (d.std(0) / d.shape[0] ** 0.5).numpy()

    def edge_run(self, name: str, steps: int, lr: float) -> torch.nn.Module:
        """SISS (project form, weight 1: the edge ``n*lam_i = 1`` of FU's dual domain) for ``steps``
        at ``lr``, with the rehearsal's batch, constraint draws and run seed; the fine-tuned UNet."""
        budgets = forward_kl_budgets(self.l_pre.mean(0), self.G, self.cfg.forward_kl_gap_fraction)
        return self.unlearn_run(name, steps, lr, method="siss", budgets=tuple(budgets.tolist()), siss_form="project",
                                siss_weight=1.0)[0]

    def unlearn_run(self, name: str, steps: int, lr: float, **kw) -> tuple[torch.nn.Module, dict]:
        """``scale.data.run`` on the rehearsal's model and images (its batch, constraint draws and run
        seed unless ``kw`` says otherwise) into ``<out>/fu-budgets/<name>``: the fine-tuned UNet and
        the run's summary."""
        cfg = self.cfg
        run_dir = Path(cfg.out) / "fu-budgets" / name
        dcfg = data.DataConfig(**({"forget_draws": cfg.data_forget_draws} | kw),
            model=str(self.model_dir), out=str(run_dir), train_dir=str(self.train_dir),
            forget=tuple(self.names[:cfg.data_forget_images]),
            train=TrainConfig(steps=steps, batch_size=32, micro_batch=32, lr=lr, cpu=True,
                              checkpoint_every=steps, seed=cfg.seed))
        clear_run_dir(dcfg.out)
        res = data.run(dcfg)
        return load_unlearned_unet(load_ddpm_models(str(self.model_dir)), str(run_dir)), res


def part_old(s: Setup) -> None:
    unet, res = s.unlearn_run("old-fu", 150, 2.5e-4, method="forward_kl", budget_factor=1.15, lr_dual=1.0,
                              forget_draws=4)
    d, se = s.paired(s.forget_draws(unet), s.l_pre)
    print("## 0. FU with the old budgets (1.15 x a 16-draw estimate; 150 steps, lr 2.5e-4, 4 draws, dual step 1)")
    print(f"budgets {fmt(res['budgets'], 4)}; final n*lam {fmt(res['lam_times_n'], 2)}")
    print(f"forget-loss rise (paired) {fmt(d, 4)} +- {fmt(se, 4)} = {fmt(d / s.G, 2)} G; "
          f"retained loss {s.retain_loss(unet):.4f} (pretrained {s.r_pre:.4f})")
    print()


def part_noise(s: Setup) -> None:
    cfg = s.cfg
    by_name = {f.name: f for f in data.list_images(s.train_dir)}
    forget_png = data.load_images([by_name[n] for n in s.names[:cfg.data_forget_images]], s.dm.sample_shape)
    # the old budget: scale.data.run's 16-random-draw estimate on the png-read images, times 1.15
    l16 = data.forget_losses(s.dm.unet, forget_png, s.ab, 16, data.forget_loss_seed(cfg.seed)).double()
    # 512 random (timestep, noise) draws per image: one draw's spread; and 512 systematic draws
    g = seeded_generator(cfg.seed, "fu-budgets:random-draws")
    D, m = 512, s.x_forget.shape[0]
    t = torch.randint(0, s.ab.numel(), (D, m), generator=g)
    noise = torch.randn((D, *s.x_forget.shape), generator=g)
    rep = s.x_forget.unsqueeze(0).expand(D, *s.x_forget.shape).reshape(-1, *s.x_forget.shape[1:])
    lr_ = data.denoising_losses(s.dm.unet, rep, t.reshape(-1), noise.reshape(-1, *s.x_forget.shape[1:]),
                                s.ab).reshape(D, m).double()
    l512 = fixed_draw_losses(s.dm.unet, s.x_forget, s.ab, D, derive_seed(cfg.seed, "fu-budgets:systematic-draws")).double()
    mean_r, sd1 = lr_.mean(0), lr_.std(0)
    sd4_emp = lr_.reshape(D // 4, 4, m).mean(1).std(0)
    ref = l512.mean(0)
    print("## 1. The old budgets (1.15 x a 16-random-draw estimate)")
    print(f"16-draw estimate              {fmt(l16, 4)}")
    print(f"old budget 1.15 x             {fmt(1.15 * l16, 4)}")
    print(f"512 random draws +- se        {fmt(mean_r, 4)}  (+- {fmt(sd1 / D ** 0.5, 4)})")
    print(f"512 systematic draws          {fmt(ref, 4)}  (the paired 500: {fmt(s.l_pre.mean(0), 4)})")
    print(f"old budget / loss - 1         {fmt(100 * (1.15 * l16 / ref - 1), 0)} %  (asked: +15 %)")
    print(f"16-draw estimate / loss - 1   {fmt(100 * (l16 / ref - 1), 0)} %")
    print(f"sd of one draw / mean         {fmt(sd1 / mean_r, 2)}")
    print(f"sd of the 4-draw estimate     {fmt(sd1 / 2, 3)}  (empirical, 128 groups of 4: {fmt(sd4_emp, 3)})")
    print(f"sd of the 16-draw estimate    {fmt(sd1 / 4, 3)}")
    print()


def part_retrain(s: Setup, seeds: int) -> dict:
    cfg = s.cfg
    l_train = fixed_draw_losses(s.dm.unet, s.x_train, s.ab, 64, derive_seed(cfg.seed, "fu-budgets:train-loss")).double()
    l_held = fixed_draw_losses(s.dm.unet, s.x_heldout, s.ab, 64, derive_seed(cfg.seed, "fu-budgets:heldout-loss")).double()
    print("## 2. Retraining without the forget images")
    print(f"pretrained: mean loss on the {s.x_train.shape[0]} training images {float(l_train.mean()):.4f}, "
          f"on {s.x_heldout.shape[0]} unseen digits {float(l_held.mean()):.4f} (64 draws each)")
    print(f"memorisation gap G (the rehearsal's): {s.G:.4f} +- {s.mem['gap_se']:.4f} "
          f"(retained {s.mem['retain_loss']:.4f}, held-out {s.mem['heldout_loss']:.4f})")
    print(f"pretrained forget losses {fmt(s.l_pre.mean(0), 4)}, retained loss {s.r_pre:.4f}")
    adds = []
    for k in range(seeds):
        rcfg = replace(cfg, seed=derive_seed(cfg.seed, f"retrain-without-forget:{k}"))
        path = Path(cfg.out) / "fu-budgets" / f"retrain-without-forget-{k}"
        t0 = time.time()
        pretrain_ddpm(rcfg, s.x_retain, path)
        dt = time.time() - t0
        unet = load_ddpm_models(str(path)).unet
        l_post = s.forget_draws(unet)
        d, se = s.paired(l_post, s.l_pre)
        adds.append(d)
        print(f"retrain {k} ({dt:.0f} s): forget losses {fmt(l_post.mean(0), 4)} "
              f"(x{fmt(l_post.mean(0) / s.l_pre.mean(0), 2)} pretrained; added {fmt(d, 3)} +- {fmt(se, 3)}, "
              f"i.e. {fmt(d / s.G, 2)} G), retained loss {s.retain_loss(unet):.4f}")
    a = np.array(adds)
    print(f"added over {seeds} seeds: {a.min():.3f}-{a.max():.3f} (G = {s.G:.4f}); "
          f"ratios to pretrained {(a / s.l_pre.mean(0).numpy() + 1).min():.2f}-{(a / s.l_pre.mean(0).numpy() + 1).max():.2f}")
    print()
    return {"added": a}


def part_edge(s: Setup) -> None:
    print("## 3. The edge of the dual domain (SISS at weight 1 = training on the retained images only)")
    print("| steps | lr | forget-loss rise (paired) +- se | mean rise | mean rise / G | retained loss | retained rel. rise |")
    print("|---|---|---|---|---|---|---|")
    for steps, lr in ((150, 2.5e-4), (300, 2.5e-4), (150, 1e-3), (50, 1e-3)):
        unet = s.edge_run(f"edge-{steps}-{lr:g}", steps, lr)
        d, se = s.paired(s.forget_draws(unet), s.l_pre)
        r = s.retain_loss(unet)
        print(f"| {steps} | {lr:g} | {fmt(d, 3)} +- {fmt(se, 3)} | {d.mean():+.3f} | {d.mean() / s.G:.2f} | "
              f"{r:.4f} | {100 * (r / s.r_pre - 1):+.1f} % |")
    print()


def part_fraction(s: Setup, fraction: float = 0.25) -> None:
    cfg = s.cfg
    budgets = forward_kl_budgets(s.l_pre.mean(0), s.G, fraction)
    print(f"## 4. Gap fraction {fraction}: budgets {fmt(budgets, 4)} (pretrained + {fraction * s.G:.4f})")
    lr = cfg.data_lr
    for steps in (150, cfg.preset["data_unlearn_steps"]):
        unet = s.edge_run(f"edge-{steps}-{lr:g}", steps, lr)
        l_post = s.forget_draws(unet)
        margin, se = s.paired(l_post, s.l_pre + fraction * s.G)
        missed = margin < 0
        print(f"SISS (edge), {steps} steps at lr {lr:g}: after - budget {fmt(margin, 4)} +- {fmt(se, 4)}; "
              f"missed {int(missed.sum())} of {len(margin)}"
              + (f" by {fmt(-margin[missed], 4)}" if missed.any() else ""))
    print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/rehearse-fu-budgets", help="the rehearsal's output folder (its pretrained "
                    "models are cached in <out>/pretrained); this script's runs go to <out>/fu-budgets")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--retrain-seeds", type=int, default=2)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"unknown parts {bad}; choose from {PARTS}")
    torch.set_num_threads(1)
    cfg = RehearseConfig(out=args.out, size=args.size, seed=args.seed, methods=("siss",))
    s = Setup(cfg)
    print(f"# FU budgets, rehearsal size {cfg.size}, seed {cfg.seed} (rehearsal's data part: {s.rehearsal_s:.0f} s)")
    print(f"pretrained forget losses (paired, 500 draws) {fmt(s.l_pre.mean(0), 4)}; retained {s.r_pre:.4f}; "
          f"G = {s.G:.4f} +- {s.mem['gap_se']:.4f}")
    siss = s.rehearsal["methods"]["siss"]
    rise = np.asarray(siss["forget_loss_fixed_draws"]) - s.l_pre.mean(0).numpy()
    print(f"the rehearsal's SISS ({cfg.preset['data_unlearn_steps']} steps, lr {cfg.data_lr:g}): forget-loss rise "
          f"{fmt(rise, 3)} = {fmt(rise / s.G, 2)} G")
    print()
    if "old" in parts:
        part_old(s)
    if "noise" in parts:
        part_noise(s)
    if "retrain" in parts:
        part_retrain(s, args.retrain_seeds)
    if "edge" in parts:
        part_edge(s)
    if "fraction" in parts:
        part_fraction(s)


if __name__ == "__main__":
    main()
