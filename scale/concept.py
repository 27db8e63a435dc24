"""Concept unlearning on a text-to-image diffusion model (Stable Diffusion layout): RU primal-dual
(``method="reverse_kl"``), RU dual-only (``"reverse_kl_dual_only"``), ESD (``"esd"``: RU at a fixed
multiplier) and LU primal-dual (``"likelihood"``) (docs/math.md eqs. 6-9, 15, 26, 29, 30;
``scale.names``: the short forms ``ru``, ``ru_dual_only``, ``lu`` are accepted as aliases).

Every method trains the model *under the concept prompts* towards an ESD-form noise target built
from the frozen reference (the same UNet with its adapters disabled):

- RU / ESD: ``eps* = eps_base - sum_i eta_i (eps_{c_i} - eps_base)``, ``eta = lam / (1 - sum lam)``
  (``toy.core.objectives.composed_eps_target``), with ``eps_base`` the reference under the baseline
  prompt (``""``: the null prompt, as ESD; or an anchor prompt). ESD fixes ``eta``.
- LU: ``eps* = eps_base - sum_i lam_i c_i(x) (eps_{c_i} - eps_base)`` with the state-dependent
  weight ``c_i = r_i(x_0)`` (likelihood-ratio constraint) or ``1`` (log-ratio, the default), ``r_i``
  the diffusion-classifier estimate of ``q(x_0|c_i) / q(x_0|base)`` from reference denoising losses
  at the end point ``x_0`` of the state's own chain.

The states ``x_t`` come on-policy from the model being trained (ancestral sampler on a strided
schedule, stopped at a random step); ESD by default uses the published states instead (DDIM with
classifier-free guidance ``esd_guidance`` on ``esd_ddim_steps`` steps, stopped at a random step;
``esd_sampler="ancestral"`` gives RU's). Constraint estimates per step:
RU ``KL(p||q_i)`` as the one-term path-KL estimate ``S w_s ||eps_theta - eps_{c_i}||^2``;
LU ``E_p[g_i]`` at the end points of the same chains (run on past the stop step), with the
stratified, antithetic ELBO-difference estimate of ``log r_i`` (``ConceptTask.likelihood_log_ratio``).

Retain term. The objective ``KL(p||q)`` is over the whole model, i.e. ``E_{c~pi} KL(p(.|c)||q(.|c))``
over a prompt distribution ``pi``, while the constraints concern only the concept prompts. For a
prompt ``r`` that is not a concept the Lagrangian's minimiser is ``p(.|r) = q(.|r)``, whose noise
target is the frozen reference ``eps_ref(x_t, r)``. With ``pi`` giving the retain prompts
(``retain_prompts``, uniformly) ``retain_weight`` times the mass of the concept prompts, the primal
loss gains ``retain_weight * mean_r ||eps_theta(x_t, r) - eps_ref(x_t, r)||^2`` at on-policy states of
the model under ``r`` (a second random stream, ``step_generator(seed, step, "retain")``); the concept
targets, constraints and multipliers are unchanged (the objective is normalised by the concept
prompts' mass).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from scale import figures
from scale.diffusion import likelihood_weight
from toy.core.diffusion import add_noise, ancestral_step, ddim_step, strided_kl_weights, strided_timesteps
from scale.engine import Slice, StepOut, TrainConfig, make_accelerator, make_optimizer, run_loop, step_generator
from scale.models import ESD_X_TARGETS, Trainable, encode_prompts, load_concept_models
from scale.names import CONCEPT_METHODS, PROBLEM, canonical_method
from theory.config import config_to_dict
from toy.core.dual import DualState, dual_domain
from toy.core.objectives import composed_eps_target, denoising_loss, eta_from_lam, lam_from_eta
from toy.core.diffusion import reverse_step_kl_weights
from toy.core.runs import RunDir

log = logging.getLogger(__name__)

METHODS = CONCEPT_METHODS
ESD_SAMPLERS = ("ddim_cfg", "ancestral")


@dataclass(frozen=True)
class ConceptConfig:
    model: str = ""
    out: str = "runs/concept"
    method: str = "reverse_kl"
    concepts: tuple[str, ...] = ()
    baseline_prompt: str = ""
    retain_prompts: tuple[str, ...] = ()
    retain_weight: float = 1.0
    budgets: tuple[float, ...] = ()
    lr_dual: float = 0.05
    lam_init: tuple[float, ...] = ()
    lam_sum_max: float = 0.95
    esd_eta: float = 1.0
    esd_sampler: str = "ddim_cfg"
    esd_guidance: float = 3.0
    esd_ddim_steps: int = 50
    likelihood_constraint: str = "log_likelihood_ratio"
    likelihood_log_ratio_max: float = 5.0
    classifier_draws: int = 4
    classifier_t_min: int = 0
    likelihood_antithetic: bool = True
    sample_steps: int = 20
    dual_only_steps: int = 50
    trainable: str = "lora"
    lora_rank: int = 4
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ESD_X_TARGETS
    local_files_only: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        object.__setattr__(self, "method", canonical_method(self.method, METHODS))
        if not self.concepts:
            raise ValueError("concepts must list at least one prompt to unlearn")
        if self.method != "esd" and len(self.budgets) not in (1, len(self.concepts)):
            raise ValueError(f"budgets must have 1 or {len(self.concepts)} entries, got {list(self.budgets)}")
        if self.method == "likelihood" and self.likelihood_constraint not in ("likelihood_ratio", "log_likelihood_ratio"):
            raise ValueError(f"likelihood_constraint must be 'likelihood_ratio' or 'log_likelihood_ratio', "
                             f"got {self.likelihood_constraint!r}")
        if not 0 < self.lam_sum_max < 1:
            raise ValueError(f"lam_sum_max must lie in (0, 1) (the RU tilt needs sum(lam) < 1), got {self.lam_sum_max}")
        if self.esd_eta < 0:
            raise ValueError(f"esd_eta must be >= 0, got {self.esd_eta}")
        if self.sample_steps < 1 or self.classifier_draws < 1:
            raise ValueError("sample_steps and classifier_draws must be >= 1")
        if self.esd_sampler not in ESD_SAMPLERS:
            raise ValueError(f"esd_sampler must be one of {ESD_SAMPLERS}, got {self.esd_sampler!r}")
        if self.esd_ddim_steps < 1 or self.esd_guidance < 0:
            raise ValueError(f"esd_ddim_steps must be >= 1 and esd_guidance >= 0, got {self.esd_ddim_steps}, "
                             f"{self.esd_guidance}")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be >= 0, got {self.retain_weight}")
        both = sorted(set(self.retain_prompts) & set(self.concepts))
        if both:
            raise ValueError(f"prompt(s) {both} are both concepts to unlearn and retain prompts")
        if self.baseline_prompt in self.concepts:
            raise ValueError(f"baseline_prompt {self.baseline_prompt!r} is one of the concepts: the guidance "
                             "difference eps_c - eps_base would vanish and nothing would be unlearned")


def _unet_eps(unet, x, t, emb) -> torch.Tensor:
    return unet(x, t, encoder_hidden_states=emb).sample.float()


class ConceptTask:
    """Holds models, embeddings and schedules; ``step`` is the engine's step function."""

    def __init__(self, cfg: ConceptConfig, models, trainable: Trainable, accelerator, model):
        self.cfg = cfg
        self.models = models
        self.trainable = trainable
        self.acc = accelerator
        self.model = model  # prepared (possibly DDP-wrapped) UNet
        self.unet = trainable.unet
        dev = accelerator.device
        models.text_encoder.to(dev)
        self.emb_concepts = encode_prompts(models.tokenizer, models.text_encoder, list(cfg.concepts)).to(dev)
        self.emb_base = encode_prompts(models.tokenizer, models.text_encoder, [cfg.baseline_prompt],
                                       check_nonempty=False).to(dev)
        self.m = len(cfg.concepts)
        self.R = len(cfg.retain_prompts)
        self.emb_retain = (encode_prompts(models.tokenizer, models.text_encoder, list(cfg.retain_prompts),
                                          check_nonempty=False).to(dev) if self.R else None)
        self.shape = models.sample_shape
        self.ab = models.alphas_cumprod
        self.T = self.ab.numel()
        self.ts = strided_timesteps(self.T, cfg.sample_steps)
        self.S = self.ts.numel()
        self.ab_path = self.ab[self.ts]  # descending time
        self.ab_prev = torch.cat([self.ab[self.ts[1:]], self.ab.new_ones(1)])
        self.w_path = strided_kl_weights(self.ab, self.ts)  # (S,), float64
        self.w_full = reverse_step_kl_weights(self.ab)
        self.d = int(torch.tensor(self.shape).prod())

    # ---- helpers
    def _emb(self, emb: torch.Tensor, n: int) -> torch.Tensor:
        return emb.expand(n, *emb.shape[1:]) if emb.shape[0] == 1 else emb

    def _ref_eps(self, x_t, t):
        """Reference eps under the base prompt and every concept: (b,...), (m, b, ...)."""
        b = x_t.shape[0]
        embs = [self._emb(self.emb_base, b)] + [self._emb(self.emb_concepts[i:i + 1], b) for i in range(self.m)]
        with torch.no_grad(), self.trainable.reference() as ref, self.acc.autocast():
            out = _unet_eps(ref, x_t.repeat(1 + self.m, *[1] * (x_t.dim() - 1)), t.repeat(1 + self.m),
                            torch.cat(embs))
        out = out.reshape(1 + self.m, b, *x_t.shape[1:])
        return out[0], out[1:]

    def _draw_states(self, gen, B, sl: Slice, guided_lam=None, retain: bool = False, finish: bool = False):
        """On-policy states: run the ancestral sampler from noise and stop at a random step.

        ``guided_lam=None`` samples the model being trained under each sample's concept prompt
        (``retain=True``: under the retain prompts, cycled from a random offset);
        otherwise the reference composed at ``eta(lam)`` (RU dual-only) and the full path KL
        ``sum_s w_s ||eps_p - eps_{c_i}||^2`` is returned alongside. ``finish=True`` (LU) runs every
        chain to its end and returns the end points ``x_end`` as well: the same random draws, so the
        states at the stop steps are those of ``finish=False``.

        Returns ``(x, stop, k, emb, path_kl, x_end)``: states (b, ...), their step indices into
        ``self.ts``, concept (or retain) indices, embeddings, path KL (m, b) and end points (or None).
        """
        if retain:
            offset = int(torch.randint(0, self.R, (1,), generator=gen))
            concept_idx = (torch.arange(B) + offset) % self.R
        else:
            concept_idx = torch.arange(B) % self.m
        z = torch.randn((B, *self.shape), generator=gen)
        stop = torch.randint(0, self.S, (B,), generator=gen)
        noises = [torch.randn((B, *self.shape), generator=gen) for _ in range(self.S - 1)]
        dev = self.acc.device
        x = sl.take(z).to(dev)
        stop, k = sl.take(stop), sl.take(concept_idx)
        emb = (self.emb_retain if retain else self.emb_concepts)[k.to(dev)]
        b = x.shape[0]
        path_kl = torch.zeros(self.m, b, dtype=torch.float64)
        full = guided_lam is not None or finish
        if guided_lam is not None:
            eta = eta_from_lam(guided_lam).float()
            stop = torch.full_like(stop, self.S - 1)  # dual-only: full trajectories
        x_stop, x_end = x, None
        for s in range(self.S if full else int(stop.max())):
            t = torch.full((b,), int(self.ts[s]), device=dev)
            if guided_lam is not None:
                eps_base, eps_i = self._ref_eps(x, t)
                eps_p = composed_eps_target(eps_base, eps_i, eta.to(dev))
                d2 = (eps_p.unsqueeze(0) - eps_i).pow(2).flatten(2).sum(2).double().cpu()
                path_kl += float(self.w_path[s]) * d2
            else:
                with torch.no_grad(), self.acc.autocast():
                    eps_p = _unet_eps(self.unet, x, t, emb)
            at_stop = (stop == s).to(dev).reshape(-1, *[1] * (x.dim() - 1))
            x_stop = torch.where(at_stop, x, x_stop)
            ab_t = torch.full((b,), float(self.ab_path[s]), device=dev)
            ab_prev = torch.full((b,), float(self.ab_prev[s]), device=dev)
            if s == self.S - 1:  # the last step is the mean (Tweedie's x_0 at the last timestep)
                x_end = ancestral_step(x, eps_p, ab_t, ab_prev, None) if finish else None
                break
            x = ancestral_step(x, eps_p, ab_t, ab_prev, sl.take(noises[s]).to(dev))
        if not full:  # chains that stopped before the loop's last step: x_stop holds them already
            x_stop = torch.where((stop == int(stop.max())).to(dev).reshape(-1, *[1] * (x.dim() - 1)), x, x_stop)
        return x_stop, stop, k, emb, path_kl, x_end

    def _draw_states_ddim_cfg(self, gen, B, sl: Slice):
        """ESD as published: states from deterministic DDIM with classifier-free guidance
        ``esd_guidance`` (null branch: the baseline prompt) on ``esd_ddim_steps`` steps, from the model
        being trained, stopped at a uniformly drawn step. Returns ``(x, t, k, emb)``."""
        cfg = self.cfg
        ts = strided_timesteps(self.T, cfg.esd_ddim_steps)
        concept_idx = torch.arange(B) % self.m
        z = torch.randn((B, *self.shape), generator=gen)
        stop = torch.randint(0, ts.numel(), (B,), generator=gen)
        dev = self.acc.device
        x, stop, k = sl.take(z).to(dev), sl.take(stop), sl.take(concept_idx)
        emb = self.emb_concepts[k.to(dev)]
        b = x.shape[0]
        emb_null = self._emb(self.emb_base, b)
        for s in range(int(stop.max()) if b else 0):
            t = torch.full((b,), int(ts[s]), device=dev)
            with torch.no_grad(), self.acc.autocast():
                e = _unet_eps(self.unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([emb_null, emb]))
            eps = e[:b] + cfg.esd_guidance * (e[b:] - e[:b])
            ab_prev = self.ab[ts[s + 1]] if s + 1 < ts.numel() else self.ab.new_tensor(1.0)
            x_next = ddim_step(x, eps, torch.full((b,), float(self.ab[ts[s]]), device=dev),
                               torch.full((b,), float(ab_prev), device=dev))
            x = torch.where((s < stop).to(dev).reshape(-1, *[1] * (x.dim() - 1)), x_next, x)
        return x, ts[stop].to(dev), k, emb

    def likelihood_log_ratio(self, x0: torch.Tensor, gen: torch.Generator, B: int, sl: Slice) -> torch.Tensor:
        """Diffusion-classifier ``log q(x0|c_i) / q(x0|base)`` for every concept: (m, b), float64.

        The ELBO difference ``sum_{t >= t_min} w_t d E_n[l_base,t - l_c_i,t]`` (``w_t`` the
        ``reverse_step_kl_weights``, ``l`` per-dimension denoising losses, docs/math.md "diffusion
        classifier"), estimated without bias by stratified timesteps (``classifier_draws`` = K equal
        strata of ``[t_min, T)``, one uniform t per stratum and sample, each term times its stratum's
        size), common noise for the base and concept terms, and with ``likelihood_antithetic`` each noise
        draw paired with its negation (the leading, odd-in-n part of the loss difference cancels).
        """
        K, t_min = self.cfg.classifier_draws, self.cfg.classifier_t_min
        n_t = self.T - t_min
        if not 1 <= K <= n_t:
            raise ValueError(f"classifier_draws must lie in [1, T - classifier_t_min] = [1, {n_t}], got {K}")
        edges = t_min + torch.div(torch.arange(K + 1) * n_t, K, rounding_mode="floor")
        size = (edges[1:] - edges[:-1]).double()  # (K,)
        u = torch.rand((K, B), generator=gen, dtype=torch.float64)
        ts = (edges[:-1].unsqueeze(1) + (u * size.unsqueeze(1)).floor().long()).clamp(max=self.T - 1)
        noise = torch.randn((K, B, *self.shape), generator=gen)
        dev = self.acc.device
        b = x0.shape[0]
        signs = (1.0, -1.0) if self.cfg.likelihood_antithetic else (1.0,)
        out = torch.zeros(self.m, b, dtype=torch.float64)
        for j in range(K):
            t = sl.take(ts[j])
            n = sl.take(noise[j]).to(dev)
            ab = self.ab[t].to(dev)
            x_t = torch.cat([add_noise(x0, sg * n, ab) for sg in signs])
            target = torch.cat([sg * n for sg in signs])
            eps_base, eps_i = self._ref_eps(x_t, t.to(dev).repeat(len(signs)))
            l_base = denoising_loss(eps_base, target).double()
            w = (self.w_full[t] * self.d * size[j]).to(l_base.device)
            for i in range(self.m):
                diff = (l_base - denoising_loss(eps_i[i], target).double()).reshape(len(signs), b).mean(0)
                out[i] += (w * diff).cpu()
        return out

    # ---- the engine's step function
    def step(self, step: int, sl: Slice, dual: DualState, dual_only: bool) -> StepOut:
        cfg = self.cfg
        B = cfg.train.batch_size
        gen = step_generator(cfg.train.seed, step)
        lam = dual.lam.float()
        if dual_only:
            path_kl = self._draw_states(gen, B, sl, guided_lam=dual.lam)[4]
            return StepOut(None, path_kl.sum(1), torch.full((self.m,), float(path_kl.shape[1])))
        dev = self.acc.device
        x_end = None
        if cfg.method == "esd" and cfg.esd_sampler == "ddim_cfg":
            x_t, t, k, emb = self._draw_states_ddim_cfg(gen, B, sl)
            stop = None
        else:
            x_t, stop, k, emb, _, x_end = self._draw_states(gen, B, sl, finish=cfg.method == "likelihood")
            t = self.ts[stop].to(dev)
        eps_base, eps_i = self._ref_eps(x_t, t)
        b = x_t.shape[0]
        extras = {}
        if self.R:  # the retain term: on-policy states under the retain prompts, reference target
            x_r, stop_r, _, emb_r, _, _ = self._draw_states(step_generator(cfg.train.seed, step, "retain"), B, sl,
                                                            retain=True)
            t_r = self.ts[stop_r].to(dev)
            with torch.no_grad(), self.trainable.reference() as ref, self.acc.autocast():
                eps_ref_r = _unet_eps(ref, x_r, t_r, emb_r)
            with self.acc.autocast():  # one forward (DDP): concept states, then retain states
                eps_all = self.model(torch.cat([x_t, x_r]), torch.cat([t, t_r]),
                                     encoder_hidden_states=torch.cat([emb, emb_r])).sample.float()
            eps_theta, eps_theta_r = eps_all[:b], eps_all[b:]
            retain_loss = denoising_loss(eps_theta_r, eps_ref_r).sum() / B
            w_r = self.w_path[stop_r].to(dev) * self.S
            extras["retain_kl"] = float(((eps_theta_r.detach() - eps_ref_r).pow(2).flatten(1).sum(1).double()
                                         * w_r).sum()) / B
            extras["retain_loss"] = float(retain_loss.detach())
        else:
            with self.acc.autocast():
                eps_theta = self.model(x_t, t, encoder_hidden_states=emb).sample.float()
        eta, measured_sum = self.target_weights(lam, eps_theta.detach(), eps_i, stop, t, x_end, gen, B, sl, extras)
        target = composed_eps_target(eps_base, eps_i, eta)
        loss = denoising_loss(eps_theta, target).sum() / B
        if self.R:
            loss = loss + cfg.retain_weight * retain_loss
        extras["target_gap"] = float((eps_base - eps_i).pow(2).flatten(2).mean(2).sum()) / (B * self.m)
        return StepOut(loss, measured_sum, torch.full((self.m,), float(b)), extras)

    def target_weights(self, lam: torch.Tensor, eps_theta: torch.Tensor, eps_i: torch.Tensor, stop: torch.Tensor | None,
                       t: torch.Tensor, x_end: torch.Tensor | None, gen: torch.Generator, B: int, sl: Slice,
                       extras: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights ``eta`` of the composed target ``eps_base - sum_i eta_i (eps_{c_i} - eps_base)``
        and the sums (m,) of this slice's constraint estimates.

        RU / ESD: ``eta = lam / (1 - sum lam)`` (m,) and the one-term path-KL estimates
        ``S w_s ||eps_theta - eps_{c_i}||^2`` at the drawn stop steps (ESD's published DDIM states
        are not the ancestral chain's: there the logged diagnostic is ``T w_t ||.||^2`` at the
        state's timestep). LU: ``eta = lam_i c_i(x)`` (m, b) and ``g_i`` at the chains' end points
        (``likelihood_log_ratio``; ``likelihood_weight`` maps the log ratio to ``(g, c)``).
        """
        cfg, dev = self.cfg, self.acc.device
        if cfg.method == "likelihood":
            log_r = self.likelihood_log_ratio(x_end, gen, B, sl)
            g, c = likelihood_weight(log_r, cfg.likelihood_constraint, cfg.likelihood_log_ratio_max)
            extras["log_ratio"] = float(log_r.sum()) / (B * self.m)
            return (lam.reshape(-1, 1) * c.float()).to(dev), g.sum(1)
        eta = eta_from_lam(lam).to(dev)
        if stop is None:
            w = (self.w_full[t.cpu()] * self.T).to(dev)
        else:
            w = self.w_path[stop].to(dev) * self.S
        kl = (eps_theta.unsqueeze(0) - eps_i).pow(2).flatten(2).sum(2).double() * w.unsqueeze(0)
        return eta, kl.sum(1).cpu()


def initial_dual(cfg: ConceptConfig) -> DualState:
    m = len(cfg.concepts)
    if cfg.method == "esd":
        lam = lam_from_eta(torch.full((m,), cfg.esd_eta, dtype=torch.float64))
        return DualState("reverse_kl", torch.zeros(m), lr_dual=0.0, lam_init=lam)
    budgets = list(cfg.budgets) * (m if len(cfg.budgets) == 1 else 1)
    lam_init = list(cfg.lam_init) if cfg.lam_init else None
    if cfg.method == "likelihood":
        return DualState("likelihood", budgets, cfg.lr_dual, lam_init=lam_init)
    domain = dual_domain("reverse_kl", len(budgets), ru_sum_max=cfg.lam_sum_max)
    return DualState("reverse_kl", budgets, cfg.lr_dual, lam_init=lam_init, sum_max=domain.sum_max)


def run(cfg: ConceptConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Unlearn ``cfg.concepts`` from ``cfg.model``; write the run directory; return the summary."""
    models = load_concept_models(cfg.model, cfg.local_files_only)
    # fail on a bad prompt before anything else is built
    encode_prompts(models.tokenizer, models.text_encoder, list(cfg.concepts))
    if cfg.retain_prompts:
        encode_prompts(models.tokenizer, models.text_encoder, list(cfg.retain_prompts), check_nonempty=False)
    accelerator = make_accelerator(cfg.train)
    trainable = Trainable(models.unet, cfg.trainable, cfg.lora_rank, cfg.lora_alpha or None,
                          cfg.lora_targets, seed=cfg.train.seed)
    models.unet.to(accelerator.device)
    optimizer = make_optimizer(trainable.parameters(), cfg.train)
    model, optimizer = accelerator.prepare(models.unet, optimizer)
    run_dir = RunDir(cfg.out, config_to_dict(cfg), cfg.train.seed, write_provenance=accelerator.is_main_process)
    task = ConceptTask(cfg, models, trainable, accelerator, model)
    dual = initial_dual(cfg)
    D = cfg.dual_only_steps if cfg.method == "reverse_kl_dual_only" else 0
    last = run_loop(run_dir=run_dir, accelerator=accelerator, model=model, trainable=trainable,
                    optimizer=optimizer, dual=dual,
                    step_fn=lambda s, sl: task.step(s, sl, dual, dual_only=s < D),
                    cfg=cfg.train, total_steps=D + cfg.train.steps, dual_active=lambda s: s < D or D == 0,
                    resume=resume, desc=f"concept/{cfg.method}", stop_after=stop_after,
                    snapshot=figures.concept_snapshot(run_dir.path, models, trainable, cfg, dual.budgets))
    summary = {
        "problem": PROBLEM[cfg.method], "method": cfg.method,
        "concepts": list(cfg.concepts), "baseline_prompt": cfg.baseline_prompt,
        "retain_prompts": list(cfg.retain_prompts), "retain_weight": cfg.retain_weight,
        "budgets": dual.budgets, "lam": dual.lam, "constraint_values": last.get("measured"),
        "violation": last.get("violation"), "steps": dual.steps, "world_size": accelerator.num_processes,
        "weights": str(run_dir.path / "checkpoint" / "trainable.safetensors"),
    }
    if PROBLEM[cfg.method] == "reverse_kl":
        summary["eta"] = eta_from_lam(dual.lam)
    if accelerator.is_main_process:
        run_dir.write_summary(summary)
    accelerator.wait_for_everyone()
    return summary
