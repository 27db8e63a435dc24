"""Data unlearning on a DDPM (docs/math.md eqs. 11-14, 28, 31): FU primal-dual (``method="forward_kl"``;
the alias ``fu`` is accepted, ``scale.names``) with one multiplier per forget image, and the SISS
baselines (``"siss"``: fixed weight without importance sampling; ``"siss_is"``: with importance
sampling, its weights in log space).

With ``q`` the uniform law on the n training images and ``q_i = delta(a_i)``:

- objective ``E_q[l_theta] - sum_i lam_i l_theta(a_i)`` (``toy.core.objectives.signed_denoising_objective``),
  exact at every noise level because noising is linear in the law;
- constraint ``KL(q_i||p) >= b_i`` measured by the forget image's denoising loss (the ELBO up to a
  constant, simple weighting), estimated every step from ``forget_draws`` noise draws per image;
- dual domain ``0 <= lam_i <= 1/n``; ``lam_i = 1/n`` for every forget image is retraining without
  them. Multipliers are reported as ``n * lam`` ("weights" in [0, 1]) and ``lr_dual`` acts on
  that scale.

SISS comes in two forms (``siss_form``, docs/scale.md "SISS as published"): ``"published"``
(Alberti et al.: keep set ``X \\ A``, NegGrad gradient rescaled to ``siss_scaling_norm`` every
step, mixture weight ``siss_mix``) and ``"project"`` (FU at the fixed weight ``siss_weight / n``
on the full set).

Training images are read from disk when a step draws them (``TrainingImages``): memory grows with
the batch, not with the number of images; only the forget images are held in memory.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from scale import figures
from scale.diffusion import siss_log_weights
from toy.core.diffusion import add_noise
from scale.engine import Slice, StepOut, TrainConfig, make_accelerator, make_optimizer, run_loop, step_generator
from scale.models import DDPMModels, Trainable, load_ddpm_models
from scale.names import DATA_METHODS, canonical_method
from theory.config import config_to_dict
from toy.core.dual import DualState, dual_domain
from toy.core.objectives import denoising_loss
from toy.core.runs import RunDir
from toy.core.seeding import derive_seed

if TYPE_CHECKING:
    from diffusers import UNet2DModel

log = logging.getLogger(__name__)

METHODS = DATA_METHODS
SISS_FORMS = ("published", "project")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class DataConfig:
    model: str = ""
    out: str = "runs/data"
    method: str = "forward_kl"
    train_dir: str = ""
    forget: tuple[str, ...] = ()
    forget_list: str = ""
    budgets: tuple[float, ...] = ()
    budget_factor: float = 0.0
    lr_dual: float = 0.05
    siss_form: str = "published"
    siss_weight: float = 1.0
    siss_mix: float = 0.5
    siss_scaling_norm: float = 500.0
    forget_draws: int = 2
    data_workers: int = 4
    trainable: str = "full"
    local_files_only: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        object.__setattr__(self, "method", canonical_method(self.method, METHODS))
        if not self.train_dir:
            raise ValueError("train_dir (the training-image folder) is required")
        if not self.forget and not self.forget_list:
            raise ValueError("give the forget images as forget=[...] or forget_list=FILE")
        if self.method == "forward_kl" and not self.budgets and self.budget_factor <= 0:
            raise ValueError("forward_kl needs budgets=[...] (denoising-loss units) or budget_factor > 0 "
                             "(budget = factor x pretrained forget loss)")
        if self.siss_weight < 0 or not 0 < self.siss_mix < 1:
            raise ValueError(f"siss_weight must be >= 0 and siss_mix in (0, 1), got {self.siss_weight}, {self.siss_mix}")
        if self.siss_form not in SISS_FORMS:
            raise ValueError(f"siss_form must be one of {SISS_FORMS}, got {self.siss_form!r}")
        if not self.siss_scaling_norm > 0:
            raise ValueError(f"siss_scaling_norm must be > 0, got {self.siss_scaling_norm}")
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be >= 0, got {self.data_workers}")
        if self.trainable != "full":
            raise ValueError(f"data unlearning fine-tunes every DDPM weight: set trainable=\"full\" (got "
                             f"{self.trainable!r}; an unconditional UNet2DModel has no cross-attention for "
                             f"LoRA or attn2 to target)")
        if self.forget_draws < 1:
            raise ValueError(f"forget_draws must be >= 1, got {self.forget_draws}")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"training-image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"training-image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _channels(mode: str) -> int:
    """Channels of ``np.asarray(image)`` for a PIL mode (palette and 16-bit modes give one)."""
    from PIL import ImageMode

    return len(ImageMode.getmode(mode).bands)


def read_image(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image as float32 (C, H, W) in [-1, 1] (``uint8 / 127.5 - 1``)."""
    from PIL import Image

    c, h, w = shape
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (h, w, c):
        raise ValueError(f"image {path.name!r} has shape (H, W, C) = {arr.shape}, the model expects {(h, w, c)}")
    return torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def load_images(files: list[Path], shape: tuple[int, int, int]) -> torch.Tensor:
    """Images as float32 (N, C, H, W) in [-1, 1]; a wrong size or channel count is an error.
    Holds all N in memory: for a handful of images (the forget set); training sets stream
    through ``TrainingImages``."""
    return torch.stack([read_image(Path(f), shape) for f in files])


class TrainingImages:
    """The training set, read from disk on demand: ``load(idx)`` decodes exactly the images a step
    drew (``workers`` threads; PIL releases the GIL while decoding), so resident memory is
    O(batch) whatever the number of images, and what a step sees is a function of its indices
    alone (the determinism contract and exact resume are unchanged). Every file's size and
    channel count is checked from its header when the set is opened, before training."""

    def __init__(self, files: list[Path], shape: tuple[int, int, int], workers: int = 4):
        from PIL import Image

        c, h, w = shape
        for f in files:
            with Image.open(f) as im:
                got = (im.size[1], im.size[0], _channels(im.mode))
            if got != (h, w, c):
                raise ValueError(f"image {Path(f).name!r} has shape (H, W, C) = {got}, the model expects {(h, w, c)}")
        self.files = [Path(f) for f in files]
        self.shape = tuple(shape)
        self.workers = int(workers)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 (len(idx), C, H, W) in [-1, 1], in the order of ``idx``."""
        paths = [self.files[int(i)] for i in idx.reshape(-1).tolist()]
        if not paths:
            return torch.empty((0, *self.shape))
        if self.workers > 1 and len(paths) > 1:
            with ThreadPoolExecutor(min(self.workers, len(paths))) as pool:
                return torch.stack(list(pool.map(lambda p: read_image(p, self.shape), paths)))
        return torch.stack([read_image(p, self.shape) for p in paths])


def resolve_forget(cfg: DataConfig, files: list[Path]) -> list[int]:
    names = list(cfg.forget)
    if cfg.forget_list:
        fl = Path(cfg.forget_list)
        if not fl.is_file():
            raise ValueError(f"forget list {cfg.forget_list!r} does not exist")
        names += [ln.strip() for ln in fl.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    by_name = {p.name: i for i, p in enumerate(files)}
    missing = [n for n in names if Path(n).name not in by_name]
    if missing:
        raise ValueError(f"forget image(s) {missing} are not in the training folder {cfg.train_dir!r}")
    idx = [by_name[Path(n).name] for n in names]
    if len(set(idx)) != len(idx):
        raise ValueError(f"forget list has duplicates: {names}")
    return idx


def denoising_losses(unet: UNet2DModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     alphas_cumprod: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Per-sample denoising losses (N,), float32, at given timesteps and noise (no grad)."""
    out = []
    dev = next(unet.parameters()).device
    with torch.no_grad():
        for i in range(0, x0.shape[0], batch):
            x, tt, n = x0[i:i + batch].to(dev), t[i:i + batch].to(dev), noise[i:i + batch].to(dev)
            x_t = add_noise(x, n, alphas_cumprod[tt.cpu()].to(dev))
            out.append(denoising_loss(unet(x_t, tt).sample, n).cpu())
    return torch.cat(out)


def forget_loss_seed(seed: int) -> int:
    """The seed of the fixed draws on which a data run measures its forget images' denoising loss
    before and after (``run``), and the pre-flight calibrates their budgets (``scale.preflight``)."""
    return derive_seed(seed, "forget-loss-eval")


def forget_losses(unet: UNet2DModel, images: torch.Tensor, alphas_cumprod: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """Mean denoising loss of each image over ``draws`` fixed (seeded) noise/timestep draws: (N,)."""
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (draws, n), generator=g)
    noise = torch.randn((draws, *images.shape), generator=g)
    rep = images.unsqueeze(0).expand(draws, *images.shape).reshape(-1, *images.shape[1:])
    return denoising_losses(unet, rep, t.reshape(-1), noise.reshape(-1, *images.shape[1:]),
                            alphas_cumprod).reshape(draws, n).mean(0)


class DataTask:
    """One optimizer step's share of the data-unlearning objective (``step``), for every method.

    ``images`` streams the training set; ``forget_images`` (m, C, H, W) are in memory. ``unet`` is
    the bare module (used for the published SISS's gradient-norm pass), ``model`` the prepared one
    (DDP) the training forward goes through, ``params`` the trainable parameters.
    """

    def __init__(self, cfg: DataConfig, unet, model, images: TrainingImages, forget_idx, alphas_cumprod,
                 accelerator, params=None):
        self.cfg, self.unet, self.model, self.acc = cfg, unet, model, accelerator
        self.images = images
        self.shape = tuple(images.shape)
        self.forget_idx = torch.tensor(forget_idx)
        self.forget_images = images.load(self.forget_idx)
        self.n = len(images)
        self.m = len(forget_idx)
        in_a = torch.zeros(self.n, dtype=torch.bool)
        in_a[self.forget_idx] = True
        self.keep_idx = torch.nonzero(~in_a).flatten()  # X \ A, the published SISS's keep set
        self.ab = alphas_cumprod
        self.T = alphas_cumprod.numel()
        self.params = list(params) if params is not None else [p for p in unet.parameters() if p.requires_grad]
        self._neg_scale: tuple[int, float] | None = None  # (step, scaling_norm / ||grad L_a||)
        self.published = cfg.method in ("siss", "siss_is") and cfg.siss_form == "published"
        if self.published and cfg.train.batch_size < self.m:
            raise ValueError(f"train.batch_size = {cfg.train.batch_size} is smaller than the {self.m} forget images: "
                             f"published SISS draws each forget image at least once per step")
        if self.published and self.keep_idx.numel() == 0:
            raise ValueError(f"every one of the {self.n} training images is in the forget set: the keep set "
                             f"X \\ A is empty")

    def step(self, step: int, sl: Slice, dual: DualState) -> StepOut:
        if self.published:
            return self._published_siss_step(step, sl)
        cfg = self.cfg
        B, m, K = cfg.train.batch_size, self.m, cfg.forget_draws
        gen = step_generator(cfg.train.seed, step)
        dev = self.acc.device
        lam = dual.lam.float()
        idx = torch.randint(0, self.n, (B,), generator=gen)
        t = torch.randint(0, self.T, (B,), generator=gen)
        noise = torch.randn((B, *self.shape), generator=gen)
        meas_sum = torch.zeros(m, dtype=torch.float64)
        meas_cnt = torch.zeros(m, dtype=torch.float64)
        if cfg.method == "siss_is":
            a_pick = (torch.randint(0, m, (1,), generator=gen) + torch.arange(B)) % m  # cycled: see _published_draws
            from_a = torch.rand((B,), generator=gen) < cfg.siss_mix
            idx, t, noise, a_pick, from_a = (sl.take(v) for v in (idx, t, noise, a_pick, from_a))
            x0 = self.images.load(idx).to(dev)
            a0 = self.forget_images[a_pick].to(dev)
            ab = self.ab[t].to(dev)
            noise = noise.to(dev)
            x_t = add_noise(torch.where(from_a.to(dev).reshape(-1, 1, 1, 1), a0, x0), noise, ab)
            log_wx, log_wa = siss_log_weights(x_t, x0, a0, ab, cfg.siss_mix)
            with self.acc.autocast():
                eps_theta = self.model(x_t, t.to(dev)).sample.float()
            s_ab = ab.float().reshape(-1, 1, 1, 1)
            eps_x = (x_t - s_ab.sqrt() * x0) / (1 - s_ab).sqrt()
            eps_a = (x_t - s_ab.sqrt() * a0) / (1 - s_ab).sqrt()
            l_x, l_a = denoising_loss(eps_theta, eps_x), denoising_loss(eps_theta, eps_a)
            w_x, w_a = log_wx.exp().float(), log_wa.exp().float()
            lam_a = lam.to(dev)[a_pick.to(dev)] * m  # sum_i lam_i E_{a_i} = (m lam) E_{a ~ unif(A)}
            loss = ((w_x * l_x).sum() - (lam_a * w_a * l_a).sum()) / B
            meas_sum.index_add_(0, a_pick, (w_a * l_a).detach().double().cpu())
            meas_cnt.index_add_(0, a_pick, torch.ones(a_pick.shape[0], dtype=torch.float64))
            return StepOut(loss, meas_sum, meas_cnt)
        # forward_kl / siss (no importance sampling): one batch of training images + K draws per forget image
        f_img = torch.arange(m).repeat(K)
        f_t = torch.randint(0, self.T, (m * K,), generator=gen)
        f_noise = torch.randn((m * K, *self.shape), generator=gen)
        idx, t, noise = sl.take(idx), sl.take(t), sl.take(noise)
        f_img, f_t, f_noise = sl.take(f_img), sl.take(f_t), sl.take(f_noise)
        x0 = torch.cat([self.images.load(idx), self.forget_images[f_img]]).to(dev)
        tt = torch.cat([t, f_t]).to(dev)
        nn_ = torch.cat([noise, f_noise]).to(dev)
        x_t = add_noise(x0, nn_, self.ab[tt.cpu()].to(dev))
        with self.acc.autocast():
            eps_theta = self.model(x_t, tt).sample.float()
        l = denoising_loss(eps_theta, nn_)
        b = idx.shape[0]
        l_r, l_f = l[:b], l[b:]
        loss = l_r.sum() / B - (lam.to(dev)[f_img.to(dev)] * l_f).sum() / K
        meas_sum.index_add_(0, f_img, l_f.detach().double().cpu())
        meas_cnt.index_add_(0, f_img, torch.ones(f_img.shape[0], dtype=torch.float64))
        return StepOut(loss, meas_sum, meas_cnt, {"retain_loss": float(l_r.detach().sum()) / B})

    # ------------------------------------------------------------ SISS as published

    def _published_draws(self, step: int) -> dict[str, torch.Tensor]:
        """The global batch of a published-SISS step: keep image ``x ~ unif(X \\ A)``, forget image
        ``a ~ unif(A)``, one timestep and one noise shared by the pair, and (with importance
        sampling) the mixture component. The forget images are cycled from a random offset
        (``a_b = (u + b) mod m``): each is still uniform on A, and every forget image appears in
        every batch of at least m (the logged per-image loss needs one)."""
        B = self.cfg.train.batch_size
        gen = step_generator(self.cfg.train.seed, step)
        d = {"x": self.keep_idx[torch.randint(0, self.keep_idx.numel(), (B,), generator=gen)],
             "a": (torch.randint(0, self.m, (1,), generator=gen) + torch.arange(B)) % self.m,
             "t": torch.randint(0, self.T, (B,), generator=gen),
             "noise": torch.randn((B, *self.shape), generator=gen)}
        if self.cfg.method == "siss_is":
            d["from_a"] = torch.rand((B,), generator=gen) < self.cfg.siss_mix
        return d

    def _published_terms(self, d: dict[str, torch.Tensor], net):
        """``(L_x, L_a, l_a)`` of one slice of draws: the keep and NegGrad terms (sums over pixels,
        divided by the global batch, as the published loss) and each sample's per-pixel forget
        loss (the logged constraint estimate)."""
        cfg, dev = self.cfg, self.acc.device
        B = cfg.train.batch_size
        x0 = self.images.load(d["x"]).to(dev)
        a0 = self.forget_images[d["a"]].to(dev)
        ab = self.ab[d["t"]].to(dev)
        noise, tt = d["noise"].to(dev), d["t"].to(dev)
        if cfg.method == "siss_is":
            x_t = add_noise(torch.where(d["from_a"].to(dev).reshape(-1, 1, 1, 1), a0, x0), noise, ab)
            log_wx, log_wa = siss_log_weights(x_t, x0, a0, ab, cfg.siss_mix)
            with self.acc.autocast():
                eps_theta = net(x_t, tt).sample.float()
            s_ab = ab.float().reshape(-1, 1, 1, 1)
            eps_x = (x_t - s_ab.sqrt() * x0) / (1 - s_ab).sqrt()
            eps_a = (x_t - s_ab.sqrt() * a0) / (1 - s_ab).sqrt()
            sq_x = (eps_theta - eps_x).pow(2).flatten(1).sum(1)
            sq_a = (eps_theta - eps_a).pow(2).flatten(1).sum(1)
            w_x, w_a = log_wx.exp().float(), log_wa.exp().float()
            d_pix = float(np.prod(self.shape))
            return (w_x * sq_x).sum() / B, (w_a * sq_a).sum() / B, (w_a * sq_a).detach() / d_pix
        x_t = add_noise(torch.cat([x0, a0]), torch.cat([noise, noise]), torch.cat([ab, ab]))
        with self.acc.autocast():
            eps_theta = net(x_t, torch.cat([tt, tt])).sample.float()
        sq = (eps_theta - torch.cat([noise, noise])).pow(2).flatten(1).sum(1)
        b = x0.shape[0]
        d_pix = float(np.prod(self.shape))
        return sq[:b].sum() / B, sq[b:].sum() / B, sq[b:].detach() / d_pix

    def _published_scale(self, step: int, sl: Slice) -> float:
        """``scaling_norm / ||grad L_a||`` for the whole global batch of ``step``: at the first
        micro-batch each process differentiates the NegGrad term of all its slices through the bare
        UNet (no DDP hooks fire), the gradients are summed across processes, and the norm of the
        sum fixes the scale every slice of the step uses."""
        if self._neg_scale is not None and self._neg_scale[0] == step:
            return self._neg_scale[1]
        world = self.acc.num_processes
        d = self._published_draws(step)
        total = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        for j in range(sl.index % world, sl.count, world):
            part = Slice(j, sl.count)
            _, l_a, _ = self._published_terms({k: part.take(v) for k, v in d.items()}, self.unet)
            if l_a.requires_grad:
                grads = torch.autograd.grad(l_a, self.params, allow_unused=True)
                for acc_g, g in zip(total, grads):
                    if g is not None:
                        acc_g += g.float()
        flat = torch.cat([g.reshape(-1) for g in total])
        if world > 1:
            flat = self.acc.reduce(flat, reduction="sum")
        norm = float(flat.double().norm())
        if not math.isfinite(norm) or norm <= 0:
            raise FloatingPointError(f"step {step}: NegGrad gradient norm is {norm}; cannot rescale it to "
                                     f"siss_scaling_norm = {self.cfg.siss_scaling_norm}")
        self._neg_scale = (step, self.cfg.siss_scaling_norm / norm)
        return self._neg_scale[1]

    def _published_siss_step(self, step: int, sl: Slice) -> StepOut:
        """SISS as published: gradient ``grad L_x - (s / ||grad L_a||) grad L_a`` with ``s`` =
        ``siss_scaling_norm``, ``L_x`` the keep term on ``X \\ A`` and ``L_a`` the NegGrad term;
        importance-weighted from the mixture ``(1 - mix) q(x_t|x) + mix q(x_t|a)`` for ``siss_is``
        (docs/scale.md "SISS as published")."""
        c = self._published_scale(step, sl)
        d = self._published_draws(step)
        d = {k: sl.take(v) for k, v in d.items()}
        l_x, l_a, meas = self._published_terms(d, self.model)
        meas_sum = torch.zeros(self.m, dtype=torch.float64)
        meas_cnt = torch.zeros(self.m, dtype=torch.float64)
        meas_sum.index_add_(0, d["a"], meas.double().cpu())
        meas_cnt.index_add_(0, d["a"], torch.ones(d["a"].shape[0], dtype=torch.float64))
        return StepOut(l_x - c * l_a, meas_sum, meas_cnt,
                       {"keep_loss": float(l_x.detach()), "neg_scale": c / sl.count})


def prepare_data(cfg: DataConfig) -> tuple[DDPMModels, list[Path], list[int], TrainingImages]:
    """Validate everything (model, folder, forget list, image shapes) before training starts."""
    models = load_ddpm_models(cfg.model, cfg.local_files_only)
    files = list_images(cfg.train_dir)
    forget_idx = resolve_forget(cfg, files)
    images = TrainingImages(files, models.sample_shape, cfg.data_workers)
    return models, files, forget_idx, images


def run(cfg: DataConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    models, files, forget_idx, images = prepare_data(cfg)
    n, m = len(images), len(forget_idx)
    if cfg.budgets and len(cfg.budgets) not in (1, m):
        raise ValueError(f"budgets must have 1 or {m} entries (one per forget image), got {list(cfg.budgets)}")
    accelerator = make_accelerator(cfg.train)
    unet = models.unet.to(accelerator.device)
    ab = models.alphas_cumprod
    eval_seed = forget_loss_seed(cfg.train.seed)
    forget_images = images.load(torch.tensor(forget_idx))
    pre_forget = forget_losses(unet, forget_images.to(accelerator.device), ab, 16, eval_seed)
    if cfg.budgets:
        budgets = torch.tensor(list(cfg.budgets) * (m if len(cfg.budgets) == 1 else 1), dtype=torch.float64)
    else:
        budgets = cfg.budget_factor * pre_forget.double()
    trainable = Trainable(unet, cfg.trainable, seed=cfg.train.seed)
    optimizer = make_optimizer(trainable.parameters(), cfg.train)
    model, optimizer = accelerator.prepare(unet, optimizer)
    run_dir = RunDir(cfg.out, config_to_dict(cfg), cfg.train.seed, write_provenance=accelerator.is_main_process)
    if cfg.method == "forward_kl":
        dual = DualState("forward_kl", budgets, cfg.lr_dual / n, upper=dual_domain("forward_kl", m, n_train=n).upper)
    else:  # SISS: a fixed weight (project form; none in the published form), not restricted to the dual domain
        weight = cfg.siss_weight if cfg.siss_form == "project" else 0.0
        dual = DualState("forward_kl", budgets if cfg.budgets or cfg.budget_factor > 0 else torch.zeros(m),
                         lr_dual=0.0, lam_init=torch.full((m,), weight / n, dtype=torch.float64))
    task = DataTask(cfg, unet, model, images, forget_idx, ab, accelerator, trainable.parameters())
    last = run_loop(run_dir=run_dir, accelerator=accelerator, model=model, trainable=trainable,
                    optimizer=optimizer, dual=dual, step_fn=lambda s, sl: task.step(s, sl, dual),
                    cfg=cfg.train, total_steps=cfg.train.steps, resume=resume, desc=f"data/{cfg.method}",
                    stop_after=stop_after, snapshot=figures.data_snapshot(
                        run_dir.path, unet, ab, forget_images,
                        images.load(torch.tensor([i for i in range(n) if i not in forget_idx][:4])),
                        dual.budgets, n, method=cfg.method))
    post_forget = forget_losses(unet, forget_images.to(accelerator.device), ab, 16, eval_seed)
    summary = {
        "problem": "forward_kl", "method": cfg.method, "n_train": n,
        "siss_form": cfg.siss_form if cfg.method != "forward_kl" else None, "neg_scale": last.get("neg_scale"),
        "forget": [files[i].name for i in forget_idx], "budgets": dual.budgets, "lam": dual.lam,
        "lam_times_n": dual.lam * n, "constraint_values": last.get("measured"),
        "violation": last.get("violation"), "forget_loss_before": pre_forget, "forget_loss_after": post_forget,
        "steps": cfg.train.steps, "world_size": accelerator.num_processes,
        "weights": str(run_dir.path / "checkpoint" / "trainable.safetensors"),
    }
    if accelerator.is_main_process:
        run_dir.write_summary(summary)
    accelerator.wait_for_everyone()
    return summary
