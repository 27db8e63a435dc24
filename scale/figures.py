"""Pictures of a scale run: sample grids before vs after unlearning, and ``curves.png`` (loss, multipliers,
constraint estimates against their budgets) from ``metrics.jsonl``.

A run hands the engine a *snapshot* (``concept_snapshot`` / ``data_snapshot``); the engine calls it
once before the first step, every ``train.sample_every`` steps (if set) and after the last step.
Each call after the first writes ``figures/grid_step<N>.png`` and ``figures/curves.png``. All
samples come from fixed seeds, so the grids of one run differ only through the model:

- concept runs: for every concept and retain prompt, ``n`` samples of the reference model (the
  frozen pretrained UNet, "before") and of the model being trained ("after"), from the same initial
  noise and sampler noise;
- data runs: the forget images and a few retained training images, each noised to the middle of
  the diffusion (fixed noise) and denoised in one Tweedie step ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``
  by the model before (cached at the first call, so a resumed run keeps the pretrained picture) and
  after; and ``n`` unconditional samples from fixed seeds.

Drawing is on the main process only and never touches the global random state.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np
import torch

from toy.core.hints import Floats
from toy.core.seeding import derive_seed, seeded_generator

if TYPE_CHECKING:
    from scale.exact import ExactTrainable
    from scale.models import ConceptModels, Trainable

log = logging.getLogger(__name__)

_DISABLED: list[bool] = []


class ConceptGridConfig(Protocol):
    """What ``concept_snapshot`` reads of a concept run's config (``scale.concept.ConceptConfig``, which
    imports this module)."""

    @property
    def concepts(self) -> Sequence[str]: ...

    @property
    def retain_prompts(self) -> Sequence[str]: ...

    @property
    def sample_steps(self) -> int: ...

    @property
    def method(self) -> str: ...


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """No pictures for the runs inside this context (the pre-flight's resume check)."""
    _DISABLED.append(True)
    try:
        yield
    finally:
        _DISABLED.pop()


#: the seed the grids' noise streams derive from (``toy.core.seeding``; independent of the training seed, so
#: runs with different seeds compare)
GRID_SEED = 20_240_601


def _to_rgb(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in about [-1, 1] -> (N, H, W, 3) floats in [0, 1]; 1 channel is grey, more than 3
    channels (latents without a VAE) show their first three."""
    x = x.detach().float().cpu().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 2:
        x = torch.cat([x, x[:, :1]], 1)
    x = x[:, :3]
    return ((x + 1) / 2).permute(0, 2, 3, 1).numpy()


def image_grid(path: str | Path, rows: Sequence[torch.Tensor], row_labels: Sequence[str], title: str = "") -> Path:
    """Save a grid PNG: row ``k`` shows the images ``rows[k]`` (N_k, C, H, W) in [-1, 1], labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(rows) != len(row_labels) or not rows:
        raise ValueError(f"need one label per row and at least one row, got {len(rows)} rows, {len(row_labels)} labels")
    cols = max(int(r.shape[0]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols + 2.2, 1.2 * len(rows) + 0.4), squeeze=False)
    for k, (r, label) in enumerate(zip(rows, row_labels)):
        imgs = _to_rgb(r)
        for j in range(cols):
            ax = axes[k, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < imgs.shape[0]:
                ax.imshow(imgs[j], interpolation="nearest")
            else:
                ax.axis("off")
        axes[k, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def curves_png(path: str | Path, rows: list[dict], budgets: Sequence[float] | None, labels: Sequence[str] = (),
               lam_scale: float = 1.0, lam_label: str = "lam") -> Path:
    """Three panels over optimizer steps: the primal loss, the multipliers (times ``lam_scale``, e.g. ``n``
    for FU's ``n * lam``) and each constraint estimate with its budget dashed (``budgets=None``: the
    run has none, e.g. ESD). ``rows`` are ``metrics.jsonl`` records (``step``, ``loss``, ``lam``, ``measured``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    steps = [r["step"] for r in rows]
    loss = [r.get("loss") for r in rows]
    pts = [(s, v) for s, v in zip(steps, loss) if v is not None]
    if pts:
        axes[0].plot(*zip(*pts), lw=1)
    axes[0].set_title("loss")
    lam = np.array([np.atleast_1d(r["lam"]) for r in rows], dtype=float) if rows else np.zeros((0, 0))
    meas = np.array([np.atleast_1d(r["measured"]) for r in rows], dtype=float) if rows else np.zeros((0, 0))
    m = lam.shape[1] if lam.ndim == 2 else 0
    names = list(labels) if len(labels) == m else [f"constraint {i}" for i in range(m)]
    for i in range(m):
        c = f"C{i % 10}"
        axes[1].plot(steps, lam_scale * lam[:, i], lw=1, color=c, label=names[i])
        axes[2].plot(steps, meas[:, i], lw=1, color=c, label=names[i])
        if budgets is not None:
            axes[2].axhline(float(budgets[i]), ls="--", lw=1, color=c)
    axes[1].set_title(lam_label)
    axes[2].set_title("constraint estimate" + (" (dashed: budget)" if budgets is not None else " (no budget)"))
    for ax in axes:
        ax.set_xlabel("step")
    if 0 < m <= 8:
        axes[2].legend(fontsize=6)
    return _save(fig, path)


# ---------------------------------------------------------------- samples


def _sample(eps_fn, shape, alphas_cumprod, steps: int, n: int, purpose: str, device) -> torch.Tensor:
    from scale.sample import sample_images

    return sample_images(eps_fn, shape, alphas_cumprod, steps, n, seeded_generator(GRID_SEED, purpose), device)


def concept_samples(models: ConceptModels, unet: torch.nn.Module, prompts: Sequence[str], n: int, steps: int,
                    device: torch.device | str) -> list[torch.Tensor]:
    """``n`` samples per prompt (conditional model, no guidance) from the streams ``grid:prompt{k}`` of
    ``GRID_SEED``, decoded by the VAE when there is one; a list of (n, C, H, W)."""
    from scale.models import encode_prompts
    from scale.sample import decode

    dev = torch.device(device)
    emb = encode_prompts(models.tokenizer, models.text_encoder, list(prompts), check_nonempty=False).to(dev)
    out = []
    for k in range(len(prompts)):
        e = emb[k:k + 1]

        def eps_fn(x, t, e=e):
            return unet(x, t, encoder_hidden_states=e.expand(x.shape[0], *e.shape[1:])).sample.float()

        x = _sample(eps_fn, models.sample_shape, models.alphas_cumprod, steps, n, f"grid:prompt{k}", dev)
        out.append(decode(models, x))
    return out


def tweedie_reconstructions(unet: torch.nn.Module, images: torch.Tensor, alphas_cumprod: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    """One-step denoising ``(x_t - sqrt(1 - a_t) eps_theta) / sqrt(a_t)`` of each image noised to step ``t``
    with fixed noise (seed ``seed``): what the model still "remembers" of the image."""
    from toy.core.diffusion import add_noise, predict_x0

    dev = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    ab = alphas_cumprod[torch.full((images.shape[0],), t)].to(dev)
    x = images.to(dev)
    tt = torch.full((images.shape[0],), t, device=dev, dtype=torch.long)
    with torch.no_grad():
        x_t = add_noise(x, noise.to(dev), ab)
        eps = unet(x_t, tt).sample.float()
        return predict_x0(x_t, eps, ab).clamp(-1, 1).cpu()


class Snapshot:
    """The engine's picture hook: ``snapshot(step)``; the first call records "before", every later
    call writes ``figures/grid_step<step>.png`` and ``figures/curves.png``."""

    def __init__(self, run_dir: str | Path, draw_before: Callable[[], tuple[list[torch.Tensor], list[str]]],
                 draw_after: Callable[[], list[torch.Tensor]], budgets, labels: Sequence[str],
                 lam_scale: float = 1.0, lam_label: str = "lam", title: str = ""):
        self.dir = Path(run_dir) / "figures"
        self.run_dir = Path(run_dir)
        self._draw_before, self._draw_after = draw_before, draw_after
        self.budgets = None if budgets is None else [float(b) for b in torch.as_tensor(budgets).reshape(-1)]
        self.labels, self.lam_scale, self.lam_label, self.title = list(labels), lam_scale, lam_label, title
        self.before: tuple[list[torch.Tensor], list[str]] | None = None
        self.calls = 0

    def _load_or_draw_before(self):
        cache = self.dir / "before.pt"
        if cache.is_file():
            return torch.load(cache, weights_only=False)
        before = self._draw_before()
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.save(before, cache)
        return before

    def __call__(self, step: int) -> Path | None:
        self.calls += 1
        if self.before is None:
            self.before = self._load_or_draw_before()
            if self.calls == 1:
                return None
        imgs, names = self.before
        after = self._draw_after()
        rows, labels = [], []
        for name, b, a in zip(names, imgs, after):
            if b.shape == a.shape and torch.equal(b, a):  # e.g. the training images themselves: one row
                rows.append(b)
                labels.append(name)
            else:
                rows += [b, a]
                labels += [f"{name}\nbefore", f"{name}\nstep {step}"]
        grid = image_grid(self.dir / f"grid_step{step}.png", rows, labels, self.title)
        self.write_curves()
        log.info("wrote %s", grid)
        return grid

    def write_curves(self) -> Path:
        return curves_png(self.dir / "curves.png", read_metrics(self.run_dir), self.budgets, self.labels,
                          self.lam_scale, self.lam_label)


def concept_snapshot(run_dir: str | Path, models: ConceptModels, trainable: Trainable | ExactTrainable,
                     cfg: ConceptGridConfig, budgets: Floats, n: int = 4, steps: int = 10) -> Snapshot | None:
    """Grids for a concept run: every concept and retain prompt, reference vs current model
    (sampler steps ``min(steps, cfg.sample_steps)``); ``None`` inside ``disabled()``."""
    if _DISABLED:
        return None
    prompts = list(cfg.concepts) + list(cfg.retain_prompts)
    names = [f"concept {p!r}" for p in cfg.concepts] + [f"retain {p!r}" for p in cfg.retain_prompts]
    k = max(1, min(steps, cfg.sample_steps))
    dev = next(trainable.unet.parameters()).device

    def before():
        with trainable.reference() as ref:
            return concept_samples(models, ref, prompts, n, k, dev), names

    def after():
        return concept_samples(models, trainable.unet, prompts, n, k, dev)

    return Snapshot(run_dir, before, after, None if cfg.method == "esd" else budgets, list(cfg.concepts),
                    title=f"{cfg.method}: samples before vs after ({k} sampler steps, fixed seeds)")


def data_snapshot(run_dir: str | Path, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, forget_images: torch.Tensor,
                  retained_images: torch.Tensor, budgets: Floats, n_train: int, n_samples: int = 4, steps: int = 10, method: str = "forward_kl") -> Snapshot | None:
    """Grids for a data run: Tweedie reconstructions at the middle of the diffusion of each forget
    image and of the given retained images, and ``n_samples`` unconditional samples (``steps`` sampler
    steps), before vs after; ``None`` inside ``disabled()``."""
    if _DISABLED:
        return None
    T = alphas_cumprod.numel()
    t_mid = T // 2
    shape = tuple(forget_images.shape[1:])
    dev = next(unet.parameters()).device
    names = ["forget images", "forget: denoised", "retained images", "retained: denoised", "samples"]

    def draw():
        rec_f = tweedie_reconstructions(unet, forget_images, alphas_cumprod, t_mid,
                                        derive_seed(GRID_SEED, "grid:forget-noise"))
        rec_r = tweedie_reconstructions(unet, retained_images, alphas_cumprod, t_mid,
                                        derive_seed(GRID_SEED, "grid:retained-noise"))

        def eps_fn(x, t):
            return unet(x, t).sample.float()

        s = _sample(eps_fn, shape, alphas_cumprod, steps, n_samples, "grid:samples", dev).clamp(-1, 1)
        return [forget_images.cpu(), rec_f, retained_images.cpu(), rec_r, s]

    lam_label = "n * lam" if method == "forward_kl" else "n * lam (fixed)"
    return Snapshot(run_dir, lambda: (draw(), names), draw, budgets,
                    [f"forget {i}" for i in range(forget_images.shape[0])], lam_scale=float(n_train), lam_label=lam_label,
                    title=f"{method}: before vs after (denoised from t={t_mid}; samples: {steps} sampler steps)")
