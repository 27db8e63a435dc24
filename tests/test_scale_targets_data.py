"""What the data-unlearning methods actually train towards, pinned by an independent computation.

For FU, SISS (project form, with and without importance sampling) and SISS as published (with and
without importance sampling) each test re-draws a step's batch from ``step_generator`` in the
documented order, reads the images with PIL, noises them, writes the method's loss out from its
formula (FU: ``E_q[l] - sum_i lam_i E_{q_i}[l]``; SISS-IS: importance weights from the Gaussian
densities ``N(x_t; sqrt(ab) x, (1 - ab) I)`` via ``torch.distributions``; published SISS: the
gradient ``grad L_x - s / ||grad L_a|| grad L_a``) and differentiates it with autograd. That
gradient is compared with the gradient of the loss ``DataTask.step`` returns (FU, at chosen
multipliers) or with the update one SGD step of ``scale.data.run`` applied (lr 1: the update *is*
the gradient).

Tolerance: both sides are float32 forwards/backwards of the same network on the same inputs
differing only in batch composition and summation order; the difference is float32 rounding,
relative ~1e-6 of the gradient's scale. The bound per tensor, ``1e-4 * max|g_tensor| + 1e-6 *
max|g_all| + 4 eps |w|``, is 100x the relative rounding; the second term covers tensors whose true
gradient is 0 (key biases: softmax ignores them) and hold rounding noise of the whole gradient's
scale, the third the rounding of ``w - g`` to float32 in the SGD update.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scale import builders
from scale.engine import Slice, TrainConfig, load_checkpoint, make_accelerator, step_generator
from tests.scale_fixtures import tiny_ddpm_folder

T = 50
N_IMG = 12
FORGET = (3, 7)
SEED = 5
B = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_ddpm_folder(tmp_path_factory.mktemp("targets"), N_IMG, image_seed=1)


def _images(imgs) -> torch.Tensor:
    """All training images, read independently of ``scale.data``: uint8 / 127.5 - 1, (N, 1, 8, 8)."""
    from PIL import Image

    out = []
    for i in range(N_IMG):
        with Image.open(imgs / f"{i:03d}.png") as im:
            out.append(torch.tensor(np.asarray(im), dtype=torch.float32)[None] / 127.5 - 1.0)
    return torch.stack(out)


def _cfg(setup, out, **kw):
    from scale.data import DataConfig

    model, imgs, _ = setup
    train = TrainConfig(**{**dict(steps=1, batch_size=B, micro_batch=B, lr=1.0, optimizer="sgd", cpu=True,
                                  seed=SEED, checkpoint_every=1), **kw.pop("train", {})})
    base = dict(model=model, out=str(out), method="forward_kl", train_dir=str(imgs),
                forget=tuple(f"{i:03d}.png" for i in FORGET), budget_factor=1.5, lr_dual=0.5, forget_draws=2,
                data_workers=0)
    return DataConfig(**{**base, **kw}, train=train)


def _fresh_unet(model):
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(model)
    unet.requires_grad_(True)
    return unet


def _ab(model) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(model).alphas_cumprod.double()


def _noised(x0, eps, ab_t):
    """Forward process written out: ``sqrt(ab) x0 + sqrt(1 - ab) eps``."""
    a = ab_t.float().reshape(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def _log_q(x_t, x0, ab_t):
    """log N(x_t; sqrt(ab) x0, (1 - ab) I), summed over pixels, float64 (torch.distributions)."""
    a = ab_t.double().reshape(-1, 1, 1, 1)
    dist = torch.distributions.Normal(a.sqrt() * x0.double(), (1 - a).sqrt().expand_as(x0.double()))
    return dist.log_prob(x_t.double()).flatten(1).sum(1)


def _is_weights(x_t, x0, a0, ab_t, mix):
    """``q(x_t|x) / q_mix`` and ``q(x_t|a) / q_mix``, ``q_mix = (1 - mix) q(.|x) + mix q(.|a)``."""
    lx, la = _log_q(x_t, x0, ab_t), _log_q(x_t, a0, ab_t)
    log_mix = torch.logsumexp(torch.stack([lx + np.log(1 - mix), la + np.log(mix)]), 0)
    return (lx - log_mix).exp().float(), (la - log_mix).exp().float()


def _grads(loss, unet):
    params = [p for p in unet.parameters() if p.requires_grad]
    return dict(zip([n for n, p in unet.named_parameters() if p.requires_grad],
                    torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)))


def _assert_grads_close(got: dict, want: dict, weights: dict | None = None):
    assert got.keys() == want.keys()
    scale = max(float(v.abs().max()) for v in want.values() if v is not None)
    for k in want:
        g, w = got[k], want[k]
        if w is None:
            w = torch.zeros_like(g)
        if g is None:
            g = torch.zeros_like(w)
        bound = 1e-4 * w.abs().max() + 1e-6 * scale  # second term: tensors whose true gradient is 0
        if weights is not None:
            bound = bound + 4 * torch.finfo(torch.float32).eps * weights[k].abs()
        assert torch.all((g - w).abs() <= bound), (k, float((g - w).abs().max()), float(w.abs().max()))


def _sgd_update(setup, out):
    """The gradient one SGD step at lr 1 applied: ``w0 - w1`` (and w1 for the rounding bound)."""
    w0 = dict(_fresh_unet(setup[0]).named_parameters())
    w1, _ = load_checkpoint(out / "checkpoint")
    return {k: w0[k].detach() - w1[k] for k in w1}, w1


# ------------------------------------------------------------------ FU and SISS (project form)


def _forward_kl_step0_losses(model, x, ab, m: int, K: int):
    """Step 0's draws of the FU/SISS (project form) step in their documented order (retain batch:
    indices, t, noise; then K draws per forget image), and the per-sample denoising losses of a fresh
    copy of the reference. Returns ``(ref, l_retain, l_forget, forget_image_of_each_draw)``."""
    g = step_generator(SEED, 0)
    idx = torch.randint(0, N_IMG, (B,), generator=g)
    t = torch.randint(0, T, (B,), generator=g)
    eps = torch.randn((B, 1, 8, 8), generator=g)
    f_img = torch.arange(m).repeat(K)
    f_t = torch.randint(0, T, (m * K,), generator=g)
    f_eps = torch.randn((m * K, 1, 8, 8), generator=g)
    ref = _fresh_unet(model)
    l_r = ((ref(_noised(x[idx], eps, ab[t]), t).sample - eps) ** 2).mean((1, 2, 3))
    l_f = ((ref(_noised(x[list(FORGET)][f_img], f_eps, ab[f_t]), f_t).sample - f_eps) ** 2).mean((1, 2, 3))
    return ref, l_r, l_f, f_img


def test_forward_kl_step_gradient_is_the_signed_denoising_objective_written_out(setup, tmp_path):
    """FU at multipliers lam = (0.3, 0.8)/n: ``grad [ (1/B) sum_b l(x_b) - sum_i lam_i (1/K) sum_k l(a_i, k) ]``."""
    from scale.data import DataTask, TrainingImages, list_images
    from scale.models import load_ddpm_models
    from toy.core.dual import DualState

    model, imgs, _ = setup
    cfg = _cfg(setup, tmp_path / "forward_kl", forget_draws=3)
    K, m = 3, len(FORGET)
    lam = torch.tensor([0.3, 0.8], dtype=torch.float64) / N_IMG
    dual = DualState("forward_kl", torch.ones(m), 0.0, lam_init=lam)
    models = load_ddpm_models(model)
    files = list_images(imgs)
    unet = models.unet
    unet.requires_grad_(True)
    task = DataTask(cfg, unet, unet, TrainingImages(files, models.sample_shape, 0), list(FORGET),
                    models.alphas_cumprod, make_accelerator(cfg.train))
    out = task.step(0, Slice(0, 1), dual)
    got = _grads(out.loss, unet)

    # independent: the draws of step 0 in their documented order, then the formula
    x = _images(imgs)
    ab = _ab(model)
    ref, l_r, l_f, f_img = _forward_kl_step0_losses(model, x, ab, m, K)
    E_q = l_r.mean()
    E_qi = torch.stack([l_f[f_img == i].mean() for i in range(m)])
    want = _grads(E_q - (lam.float() * E_qi).sum(), ref)
    _assert_grads_close(got, want)
    # the dual's constraint estimate is each forget image's mean loss over its K draws
    torch.testing.assert_close(out.measured_sum / out.measured_count, E_qi.detach().double(), rtol=1e-5, atol=1e-7)


def test_forward_kl_run_takes_one_projected_ascent_step_per_forget_image(setup, tmp_path):
    """FU through ``run``, one step: the engine's constraint estimate of forget image i is its own mean
    loss over its K draws, and the dual step is ``lam_i <- clip(lam_i + (lr_dual / n) (b_i - l_i), 0,
    1/n)`` (docs/math.md eqs. 14, 35; ``lr_dual`` acts on ``n lam``). Budgets 0.05 above image 0's
    loss (violated: lam_0 = lr 0.05 / n) and 0.05 below image 1's (satisfied: the step goes negative
    and is projected to 0). Tolerance: the losses agree to float32 rounding (rtol 1e-5, as in the
    step test); lam_0 inherits lr/n times that, far below the 1e-6 used."""
    from scale.data import run

    model, imgs, _ = setup
    x, ab, m, K = _images(imgs), _ab(model), len(FORGET), 2
    _, _, l_f, f_img = _forward_kl_step0_losses(model, x, ab, m, K)
    E = torch.stack([l_f[f_img == i].mean() for i in range(m)]).detach().double()
    lr = 0.5
    budgets = (float(E[0]) + 0.05, float(E[1]) - 0.05)
    summ = run(_cfg(setup, tmp_path / "fu", budgets=budgets, budget_factor=0.0, lr_dual=lr))
    torch.testing.assert_close(torch.as_tensor(summ["constraint_values"]).double(), E, rtol=1e-5, atol=1e-7)
    want = torch.tensor([lr / N_IMG * 0.05, 0.0], dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(summ["lam"]).double(), want, rtol=0, atol=1e-6)
    assert float(torch.as_tensor(summ["lam"])[1]) == 0.0


def test_siss_project_form_trains_forward_kl_at_the_fixed_weight(setup, tmp_path):
    """SISS (project form, no importance sampling) through ``run``: the SGD update is the gradient of
    ``E_q[l] - (w/n) sum_i E_{q_i}[l]`` on the full training set."""
    from scale.data import run

    model, imgs, _ = setup
    w = 3.0
    run(_cfg(setup, tmp_path / "s", method="siss", siss_form="project", siss_weight=w))
    got, w1 = _sgd_update(setup, tmp_path / "s")
    x, ab, m, K = _images(imgs), _ab(model), len(FORGET), 2
    ref, l_r, l_f, f_img = _forward_kl_step0_losses(model, x, ab, m, K)
    want = _grads(l_r.mean() - (w / N_IMG) * sum(l_f[f_img == i].mean() for i in range(m)), ref)
    _assert_grads_close(got, want, w1)


def test_siss_is_project_form_weights_are_the_gaussian_density_ratios(setup, tmp_path):
    """SISS with importance sampling (project form, mix 0.3) through ``run``: x_t from the mixture,
    loss ``(1/B) sum_b [w_x l(eps_x) - m lam_a w_a l(eps_a)]`` with the weights written out from
    ``N(x_t; sqrt(ab) x, (1 - ab) I)`` densities."""
    from scale.data import run

    model, imgs, _ = setup
    w, mix, m = 2.0, 0.3, len(FORGET)
    summ = run(_cfg(setup, tmp_path / "s", method="siss_is", siss_form="project", siss_weight=w, siss_mix=mix))
    got, w1 = _sgd_update(setup, tmp_path / "s")
    x, ab = _images(imgs), _ab(model)
    g = step_generator(SEED, 0)
    idx = torch.randint(0, N_IMG, (B,), generator=g)
    t = torch.randint(0, T, (B,), generator=g)
    eps = torch.randn((B, 1, 8, 8), generator=g)
    a_pick = (torch.randint(0, m, (1,), generator=g) + torch.arange(B)) % m  # cycled from a random offset
    from_a = torch.rand((B,), generator=g) < mix
    x0, a0 = x[idx], x[list(FORGET)][a_pick]
    x_t = _noised(torch.where(from_a.reshape(-1, 1, 1, 1), a0, x0), eps, ab[t])
    w_x, w_a = _is_weights(x_t, x0, a0, ab[t], mix)
    s = ab[t].float().reshape(-1, 1, 1, 1)
    ref = _fresh_unet(model)
    pred = ref(x_t, t).sample
    l_x = ((pred - (x_t - s.sqrt() * x0) / (1 - s).sqrt()) ** 2).mean((1, 2, 3))
    l_a = ((pred - (x_t - s.sqrt() * a0) / (1 - s).sqrt()) ** 2).mean((1, 2, 3))
    # sum_i lam_i E_{a_i}[.] with a ~ unif(A): lam_i = w/n for every i, so the factor is m * w / n
    want = _grads((w_x * l_x).mean() - (m * w / N_IMG * w_a * l_a).mean(), ref)
    _assert_grads_close(got, want, w1)
    # the logged constraint: each forget image's loss E_{q(x_t|a_i)}[l], importance-weighted from the
    # mixture (E_mix[w_a l_a] = E_{q(.|a)}[l_a]; unweighted l_a would be biased towards x's law);
    # float32 losses and weights against the same in a different batch order: rtol 1e-4
    per_image = torch.stack([(w_a * l_a).detach()[a_pick == i].mean() for i in range(m)]).double()
    torch.testing.assert_close(torch.as_tensor(summ["constraint_values"]).double(), per_image, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ SISS as published


@pytest.mark.parametrize("method", ["siss", "siss_is"])
def test_published_siss_gradient_is_keep_term_minus_rescaled_neggrad(setup, tmp_path, method):
    """SISS as published through ``run``: keep images from X \\ A, forget image a ~ unif(A), shared
    (t, eps) per pair; ``L_x``, ``L_a`` pixel sums over the batch (importance-weighted from the
    mixture 0.5 for siss_is); the update is ``grad L_x - s/||grad L_a|| grad L_a``, s = 0.7."""
    from scale.data import run

    model, imgs, _ = setup
    s_norm, mix, m = 0.7, 0.5, len(FORGET)
    summ = run(_cfg(setup, tmp_path / "s", method=method, siss_scaling_norm=s_norm))
    got, w1 = _sgd_update(setup, tmp_path / "s")
    x, ab = _images(imgs), _ab(model)
    keep = torch.tensor([i for i in range(N_IMG) if i not in FORGET])
    g = step_generator(SEED, 0)
    xi = keep[torch.randint(0, keep.numel(), (B,), generator=g)]
    a_pick = (torch.randint(0, m, (1,), generator=g) + torch.arange(B)) % m  # cycled from a random offset
    t = torch.randint(0, T, (B,), generator=g)
    eps = torch.randn((B, 1, 8, 8), generator=g)
    x0, a0 = x[xi], x[list(FORGET)][a_pick]
    ref = _fresh_unet(model)
    if method == "siss_is":
        from_a = torch.rand((B,), generator=g) < mix
        x_t = _noised(torch.where(from_a.reshape(-1, 1, 1, 1), a0, x0), eps, ab[t])
        w_x, w_a = _is_weights(x_t, x0, a0, ab[t], mix)
        s = ab[t].float().reshape(-1, 1, 1, 1)
        pred = ref(x_t, t).sample
        L_x = (w_x * ((pred - (x_t - s.sqrt() * x0) / (1 - s).sqrt()) ** 2).sum((1, 2, 3))).mean()
        sq_a = w_a * ((pred - (x_t - s.sqrt() * a0) / (1 - s).sqrt()) ** 2).sum((1, 2, 3))
    else:
        L_x = ((ref(_noised(x0, eps, ab[t]), t).sample - eps) ** 2).sum((1, 2, 3)).mean()
        sq_a = ((ref(_noised(a0, eps, ab[t]), t).sample - eps) ** 2).sum((1, 2, 3))
    L_a = sq_a.mean()
    g_x = _grads(L_x, ref)
    g_a = _grads(L_a, ref)
    norm_a = torch.sqrt(sum((v.double() ** 2).sum() for v in g_a.values() if v is not None))
    c = s_norm / float(norm_a)
    want = {k: (g_x[k] if g_x[k] is not None else 0) - c * g_a[k] for k in g_x}
    _assert_grads_close(got, want, w1)
    assert summ["neg_scale"] == pytest.approx(c, rel=1e-5)
    assert summ["siss_form"] == "published"
    # the logged constraint: each forget image's (importance-weighted) denoising loss per pixel (the
    # units of FU's budgets), averaged over its samples; rtol 1e-4 as above (float32, batch order)
    per_image = torch.stack([sq_a.detach()[a_pick == i].mean() / 64 for i in range(m)]).double()  # 1x8x8 pixels
    torch.testing.assert_close(torch.as_tensor(summ["constraint_values"]).double(), per_image, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ evaluation samples: the model's own sampler


def _pipeline_samples(unet, scheduler, n, steps, seed):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
               output_type="np").images
    return torch.from_numpy(np.asarray(img)).permute(0, 3, 1, 2).float()


def _ours(unet, scheduler, n, steps, seed):
    from scale.sample import scheduler_sample_images

    x = scheduler_sample_images(lambda x, t: unet(x, t).sample, (1, 8, 8), scheduler, steps, n,
                                torch.Generator().manual_seed(seed))
    return (x / 2 + 0.5).clamp(0, 1)  # the pipeline's output map


@pytest.mark.parametrize("variance_type,clip", [("fixed_small", True), ("fixed_large", False), ("fixed_small", False)])
def test_scheduler_sampler_gives_diffusers_ddpm_pipeline_samples(variance_type, clip):
    """``scheduler_sample_images`` follows the scheduler config (google/ddpm-celebahq-256's is
    fixed_small + clip_sample): with the same CPU generator it returns ``DDPMPipeline``'s samples.
    Tolerance: both are float32 computations of the same steps in a different operation order;
    1e-5 on [0, 1] images is ~100 float32 roundings."""
    from diffusers import DDPMScheduler

    unet = builders.build_uncond_unet(seed=4).eval()
    sched = DDPMScheduler(num_train_timesteps=T, beta_start=2e-3, beta_end=0.4, variance_type=variance_type,
                          clip_sample=clip)
    with torch.no_grad():
        torch.testing.assert_close(_ours(unet, sched, 3, 10, 0), _pipeline_samples(unet, sched, 3, 10, 0),
                                   rtol=0, atol=1e-5)


def test_scheduler_sampler_differs_when_the_config_differs():
    """The celebahq config (fixed_small, clip_sample) vs the same model sampled as if the config said
    fixed_large or no clipping, and vs the strided ancestral sampler (variance beta, no clipping):
    each differs from the pipeline's samples by far more than rounding (> 0.05 somewhere)."""
    from diffusers import DDPMScheduler

    from scale.sample import sample_images

    unet = builders.build_uncond_unet(seed=4).eval()
    kw = dict(num_train_timesteps=T, beta_start=2e-3, beta_end=0.4)
    ref_sched = DDPMScheduler(**kw, variance_type="fixed_small", clip_sample=True)
    with torch.no_grad():
        ref = _pipeline_samples(unet, ref_sched, 3, 10, 0)
        for other in (dict(variance_type="fixed_large", clip_sample=True),
                      dict(variance_type="fixed_small", clip_sample=False)):
            assert (_ours(unet, DDPMScheduler(**kw, **other), 3, 10, 0) - ref).abs().max() > 0.05, other
        anc = sample_images(lambda x, t: unet(x, t).sample, (1, 8, 8), ref_sched.alphas_cumprod, 10, 3,
                            torch.Generator().manual_seed(0))
        assert ((anc / 2 + 0.5).clamp(0, 1) - ref).abs().max() > 0.05
    with pytest.raises(ValueError, match="learned"):
        _ours(unet, DDPMScheduler(**kw, variance_type="learned"), 1, 2, 0)


def test_published_siss_rescaling_uses_the_global_batch_across_processes_and_micro_batches(tmp_path):
    """Two processes x two micro-batches vs one process x four: the NegGrad norm is that of the whole
    global batch's gradient (summed across slices and ranks), so the updates and the logged scale
    agree up to float32 summation order (the bound of ``_compare``)."""
    from diffusers import UNet2DModel
    from PIL import Image

    from tests.test_scale_distributed import _compare, _run

    builders.save_ddpm(tmp_path / "ddpm", builders.build_uncond_unet(seed=3),
                       builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4))
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMG):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i:03d}.png")
    common = ["--set", f'model="{tmp_path / "ddpm"}"', "--set", f'train_dir="{tmp_path / "imgs"}"',
              "--set", 'forget=["003.png","007.png"]', "--set", 'method="siss_is"', "--set", "siss_scaling_norm=0.5",
              "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.micro_batch=1",
              "--set", "train.cpu=true", "--set", 'train.optimizer="sgd"', "--set", "train.lr=0.05"]
    _run(["scale", "data", "--out", str(tmp_path / "one"), *common], 1)
    _run(["scale", "data", "--out", str(tmp_path / "two"), *common], 2)
    w0 = {k: v.detach() for k, v in UNet2DModel.from_pretrained(tmp_path / "ddpm").named_parameters()}
    _compare(tmp_path / "one", tmp_path / "two", w0)
    scale = [[json.loads(x)["neg_scale"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
             for r in ("one", "two")]
    np.testing.assert_allclose(scale[1], scale[0], rtol=1e-5)
