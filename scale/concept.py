"""Concept unlearning on a text-to-image diffusion model (Stable Diffusion layout): RU primal-dual,
RU dual-only, ESD (RU at a fixed multiplier) and LU primal-dual (MATH.md §2, §4).

Every method trains the model *under the concept prompts* towards an ESD-form noise target built
from the frozen reference (the same UNet with its adapters disabled):

- RU / ESD: ``eps* = eps_base - sum_i eta_i (eps_{c_i} - eps_base)``, ``eta = lam / (1 - sum lam)``
  (``toy.objectives.composed_eps_target``), with ``eps_base`` the reference under the baseline
  prompt (``""``: the null prompt, as ESD; or an anchor prompt). ESD fixes ``eta``.
- LU: ``eps* = eps_base - sum_i lam_i c_i(x) (eps_{c_i} - eps_base)`` with the state-dependent
  weight ``c_i = r_i(x_0)`` (likelihood-ratio constraint) or ``1`` (log-ratio), ``r_i`` the
  diffusion-classifier estimate of ``q(x_0|c_i) / q(x_0|base)`` from reference denoising losses.

The states ``x_t`` come on-policy from the model being trained (ancestral sampler on a strided
schedule, stopped at a random step), as ESD does. Constraint estimates per step:
RU ``KL(p||q_i)`` as the one-term path-KL estimate ``S w_s ||eps_theta - eps_{c_i}||^2``;
LU ``E_p[g_i]`` from the Tweedie estimate of x_0.

Retain term. The objective ``KL(p||q)`` is over the whole model, i.e. ``E_{c~pi} KL(p(.|c)||q(.|c))``
over a prompt distribution ``pi``, while the constraints concern only the concept prompts. For a
prompt ``r`` that is not a concept the Lagrangian's minimiser is ``p(.|r) = q(.|r)``, whose noise
target is the frozen reference ``eps_ref(x_t, r)``. With ``pi`` giving the retain prompts
(``retain_prompts``, uniformly) ``retain_weight`` times the mass of the concept prompts, the primal
loss gains ``retain_weight * mean_r ||eps_theta(x_t, r) - eps_ref(x_t, r)||^2`` at on-policy states of
the model under ``r`` (a second random stream, ``step_generator(seed, step, 1)``); the concept
targets, constraints and multipliers are unchanged (the objective is normalised by the concept
prompts' mass).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from scale.diffusion import (add_noise, ancestral_step, lu_weight, predict_x0, strided_kl_weights,
                             strided_timesteps)
from scale import figures
from scale.engine import Slice, StepOut, TrainConfig, make_accelerator, make_optimizer, run_loop, step_generator
from scale.models import ESD_X_TARGETS, Trainable, encode_prompts, load_concept_models
from theory.config import config_to_dict
from toy.dual import DualState
from toy.objectives import (composed_eps_target, denoising_loss, eta_from_lam, lam_from_eta,
                            log_ratio_from_denoising_losses, reverse_step_kl_weights)
from toy.runs import RunDir

log = logging.getLogger(__name__)

METHODS = ("ru", "ru_dual_only", "esd", "lu")


@dataclass(frozen=True)
class ConceptConfig:
    model: str = ""
    out: str = "runs/concept"
    method: str = "ru"
    concepts: tuple[str, ...] = ()
    baseline_prompt: str = ""
    retain_prompts: tuple[str, ...] = ()
    retain_weight: float = 1.0
    budgets: tuple[float, ...] = ()
    lr_dual: float = 0.05
    lam_init: tuple[float, ...] = ()
    lam_sum_max: float = 0.95
    esd_eta: float = 1.0
    lu_constraint: str = "likelihood_ratio"
    lu_log_ratio_max: float = 5.0
    classifier_draws: int = 4
    classifier_t_min: int = 0
    sample_steps: int = 20
    dual_only_steps: int = 50
    trainable: str = "lora"
    lora_rank: int = 4
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ESD_X_TARGETS
    local_files_only: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.concepts:
            raise ValueError("concepts must list at least one prompt to unlearn")
        if self.method != "esd" and len(self.budgets) not in (1, len(self.concepts)):
            raise ValueError(f"budgets must have 1 or {len(self.concepts)} entries, got {list(self.budgets)}")
        if self.method == "lu" and self.lu_constraint not in ("likelihood_ratio", "log_likelihood_ratio"):
            raise ValueError(f"lu_constraint must be 'likelihood_ratio' or 'log_likelihood_ratio', "
                             f"got {self.lu_constraint!r}")
        if not 0 < self.lam_sum_max < 1:
            raise ValueError(f"lam_sum_max must lie in (0, 1) (the RU tilt needs sum(lam) < 1), got {self.lam_sum_max}")
        if self.esd_eta < 0:
            raise ValueError(f"esd_eta must be >= 0, got {self.esd_eta}")
        if self.sample_steps < 1 or self.classifier_draws < 1:
            raise ValueError("sample_steps and classifier_draws must be >= 1")
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

    def _draw_states(self, gen, B, sl: Slice, guided_lam=None, retain: bool = False):
        """On-policy states: run the ancestral sampler from noise and stop at a random step.

        ``guided_lam=None`` samples the model being trained under each sample's concept prompt
        (``retain=True``: under the retain prompts, cycled from a random offset);
        otherwise the reference composed at ``eta(lam)`` (RU dual-only) and the full path KL
        ``sum_s w_s ||eps_p - eps_{c_i}||^2`` is returned alongside.
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
        if guided_lam is not None:
            eta = eta_from_lam(guided_lam).float()
            stop = torch.full_like(stop, self.S - 1)  # dual-only: full trajectories
        for s in range(int(stop.max()) + (1 if guided_lam is not None else 0)):
            t = torch.full((b,), int(self.ts[s]), device=dev)
            if guided_lam is not None:
                eps_base, eps_i = self._ref_eps(x, t)
                eps_p = composed_eps_target(eps_base, eps_i, eta.to(dev))
                d2 = (eps_p.unsqueeze(0) - eps_i).pow(2).flatten(2).sum(2).double().cpu()
                path_kl += float(self.w_path[s]) * d2
            else:
                with torch.no_grad(), self.acc.autocast():
                    eps_p = _unet_eps(self.unet, x, t, emb)
            if s == self.S - 1:
                break
            noise = sl.take(noises[s]).to(dev)
            ab_t = torch.full((b,), float(self.ab_path[s]), device=dev)
            ab_prev = torch.full((b,), float(self.ab_prev[s]), device=dev)
            x_next = ancestral_step(x, eps_p, ab_t, ab_prev, noise)
            active = (s < stop).to(dev).reshape(-1, *[1] * (x.dim() - 1))
            x = torch.where(active, x_next, x)
        return x, stop, k, emb, path_kl

    def _log_ratio(self, x0: torch.Tensor, gen, B: int, sl: Slice) -> torch.Tensor:
        """Diffusion-classifier ``log q(x0|c_i) / q(x0|base)`` for every concept: (m, b), float64."""
        K, t_min = self.cfg.classifier_draws, self.cfg.classifier_t_min
        ts = torch.randint(t_min, self.T, (K, B), generator=gen)
        noise = torch.randn((K, B, *self.shape), generator=gen)
        dev = self.acc.device
        b = x0.shape[0]
        out = torch.zeros(self.m, b, dtype=torch.float64)
        for j in range(K):
            t = sl.take(ts[j])
            n = sl.take(noise[j]).to(dev)
            x_t = add_noise(x0, n, self.ab[t].to(dev))
            eps_base, eps_i = self._ref_eps(x_t, t.to(dev))
            l_base = denoising_loss(eps_base, n)
            for i in range(self.m):
                l_i = denoising_loss(eps_i[i], n)
                w = (self.w_full[t] * self.d).to(l_i.device)
                out[i] += log_ratio_from_denoising_losses(l_i, l_base, w, self.T - t_min).double().cpu() / K
        return out

    # ---- the engine's step function
    def step(self, step: int, sl: Slice, dual: DualState, dual_only: bool) -> StepOut:
        cfg = self.cfg
        B = cfg.train.batch_size
        gen = step_generator(cfg.train.seed, step)
        lam = dual.lam.float()
        if dual_only:
            _, _, _, _, path_kl = self._draw_states(gen, B, sl, guided_lam=dual.lam)
            return StepOut(None, path_kl.sum(1), torch.full((self.m,), float(path_kl.shape[1])))
        x_t, stop, k, emb, _ = self._draw_states(gen, B, sl)
        dev = self.acc.device
        t = self.ts[stop].to(dev)
        eps_base, eps_i = self._ref_eps(x_t, t)
        b = x_t.shape[0]
        extras = {}
        if self.R:  # the retain term: on-policy states under the retain prompts, reference target
            x_r, stop_r, _, emb_r, _ = self._draw_states(step_generator(cfg.train.seed, step, 1), B, sl, retain=True)
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
        if cfg.method == "lu":
            x0 = predict_x0(x_t, eps_theta.detach(), self.ab[t.cpu()].to(dev))
            log_r = self._log_ratio(x0, gen, B, sl)
            g, c = lu_weight(log_r, cfg.lu_constraint, cfg.lu_log_ratio_max)
            eta = (lam.reshape(-1, 1) * c.float()).to(dev)  # (m, b) state-dependent weights
            measured_sum = g.sum(1)
            extras["log_ratio"] = float(log_r.sum()) / (B * self.m)
        else:
            eta = eta_from_lam(lam).to(dev)
            w = self.w_path[stop].to(dev) * self.S
            kl = (eps_theta.detach().unsqueeze(0) - eps_i).pow(2).flatten(2).sum(2).double() * w.unsqueeze(0)
            measured_sum = kl.sum(1).cpu()
        target = composed_eps_target(eps_base, eps_i, eta)
        loss = denoising_loss(eps_theta, target).sum() / B
        if self.R:
            loss = loss + cfg.retain_weight * retain_loss
        extras["target_gap"] = float((eps_base - eps_i).pow(2).flatten(2).mean(2).sum()) / (B * self.m)
        return StepOut(loss, measured_sum, torch.full((self.m,), float(b)), extras)


def initial_dual(cfg: ConceptConfig) -> DualState:
    m = len(cfg.concepts)
    if cfg.method == "esd":
        lam = lam_from_eta(torch.full((m,), cfg.esd_eta, dtype=torch.float64))
        return DualState("reverse_kl", torch.zeros(m), lr_dual=0.0, lam_init=lam)
    budgets = list(cfg.budgets) * (m if len(cfg.budgets) == 1 else 1)
    lam_init = list(cfg.lam_init) if cfg.lam_init else None
    if cfg.method == "lu":
        return DualState("likelihood", budgets, cfg.lr_dual, lam_init=lam_init)
    return DualState("reverse_kl", budgets, cfg.lr_dual, lam_init=lam_init, sum_max=cfg.lam_sum_max)


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
    D = cfg.dual_only_steps if cfg.method == "ru_dual_only" else 0
    last = run_loop(run_dir=run_dir, accelerator=accelerator, model=model, trainable=trainable,
                    optimizer=optimizer, dual=dual,
                    step_fn=lambda s, sl: task.step(s, sl, dual, dual_only=s < D),
                    cfg=cfg.train, total_steps=D + cfg.train.steps, dual_active=lambda s: s < D or D == 0,
                    resume=resume, desc=f"concept/{cfg.method}", stop_after=stop_after,
                    snapshot=figures.concept_snapshot(run_dir.path, models, trainable, cfg, dual.budgets))
    summary = {
        "problem": "likelihood" if cfg.method == "lu" else "reverse_kl", "method": cfg.method,
        "concepts": list(cfg.concepts), "baseline_prompt": cfg.baseline_prompt,
        "retain_prompts": list(cfg.retain_prompts), "retain_weight": cfg.retain_weight,
        "budgets": dual.budgets, "lam": dual.lam, "constraint_values": last.get("measured"),
        "violation": last.get("violation"), "steps": dual.steps, "world_size": accelerator.num_processes,
        "weights": str(run_dir.path / "checkpoint" / "trainable.safetensors"),
    }
    if cfg.method in ("ru", "ru_dual_only", "esd"):
        summary["eta"] = eta_from_lam(dual.lam)
    if accelerator.is_main_process:
        run_dir.write_summary(summary)
    accelerator.wait_for_everyone()
    return summary
