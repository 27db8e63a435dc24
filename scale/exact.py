"""An exact-model harness: a diffusers-compatible module that *is* a Gaussian mixture.

``MixtureUNet`` has the call signature of ``UNet2DConditionModel`` (``unet(sample, timestep,
encoder_hidden_states=...)`` returning an object with ``.sample``) and of ``UNet2DModel``
(``encoder_hidden_states`` omitted), and returns the exact noise prediction of a Gaussian mixture
with diagonal (or isotropic) components at every timestep of a DDPM schedule:

    eps(x_t, t) = -sqrt(1 - ab_t) grad log q_t(x_t) = sqrt(1 - ab_t) sum_k r_k(x_t) (x_t - sqrt(ab_t) mu_k) / v_k,
    v_k = ab_t s_k^2 + 1 - ab_t,   r_k = softmax_k(log w_k + log N(x_t; sqrt(ab_t) mu_k, diag v_k))

(docs/math.md §4, eqs. (23)-(24): noising is linear in the law; the same formula ``theory.gmm.GaussianMixture.eps`` evaluates with full
covariances, which cannot be stored at Stable Diffusion's latent size 4x64x64 = 16,384 dimensions).
Computed in float64 and cast to the input's dtype. Conditional use: one mixture per prompt
embedding; each sample's ``encoder_hidden_states`` is matched to the registered embeddings.

Plugged into the scale code in place of the UNet (with the real SD scheduler, ``sd_scheduler``), it
makes the exact constraint values known: for single-Gaussian components every quantity of a strided
ancestral chain (end-point law, path KL, ELBO terms) is a per-dimension closed form. ``ExactTrainable``
stands in for ``scale.models.Trainable``: the model being trained and the frozen reference are two
harness modules.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

__all__ = ["DiagonalMixture", "MixtureUNet", "ExactTrainable", "sd_scheduler"]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class DiagonalMixture:
    """``sum_k w_k N(mu_k, diag(var_k))`` in d dimensions, float64, validated.

    weights (K,) positive summing to 1; means (K, d); variances (K, d) positive, or (K,) / a scalar for
    isotropic components.
    """

    weights: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor

    def __post_init__(self):
        w = torch.as_tensor(self.weights, dtype=torch.float64).reshape(-1)
        mu = torch.as_tensor(self.means, dtype=torch.float64)
        if mu.dim() == 1:
            mu = mu.unsqueeze(0)
        K, d = mu.shape[0], mu.shape[-1]
        if mu.dim() != 2 or w.shape[0] != K:
            raise ValueError(f"means must have shape ({w.shape[0]}, d), got {tuple(mu.shape)}")
        var = torch.as_tensor(self.variances, dtype=torch.float64)
        if var.dim() == 0:
            var = var.reshape(1, 1).expand(K, d)
        elif var.dim() == 1 and var.shape[0] == K:
            var = var.reshape(K, 1).expand(K, d)
        if tuple(var.shape) != (K, d):
            raise ValueError(f"variances must have shape ({K}, {d}), ({K},) or be a scalar, got {tuple(var.shape)}")
        if torch.any(w <= 0) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {w.tolist()}")
        if torch.any(var <= 0) or not torch.all(torch.isfinite(var)) or not torch.all(torch.isfinite(mu)):
            raise ValueError(f"variances must be positive and finite and means finite; smallest variance "
                             f"{float(var.min()):.3g}")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", mu.contiguous())
        object.__setattr__(self, "variances", var.contiguous())

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _terms(self, x: torch.Tensor, alpha_bar: torch.Tensor):
        """log w_k + log N_k(x) (B, K) and ``(x - sqrt(ab) mu_k) / v_k`` (B, K, d) of the noised mixture."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"x has {x.shape[1]} dimensions per sample, the mixture {self.dim}")
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device).reshape(-1, 1, 1).expand(x.shape[0], 1, 1)
        mu, var = self.means.to(x.device), self.variances.to(x.device)
        v = ab * var.unsqueeze(0) + (1.0 - ab)  # (B, K, d)
        diff = x.unsqueeze(1) - ab.sqrt() * mu.unsqueeze(0)
        z = diff / v
        log_terms = self.weights.to(x.device).log() - 0.5 * ((diff * z) + v.log() + _LOG_2PI).sum(2)
        return log_terms, z

    def log_prob(self, x: torch.Tensor, alpha_bar: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``log q_t(x)`` (B,) of the mixture noised to ``alpha_bar`` (scalar or (B,); 1 = the data law)."""
        return torch.logsumexp(self._terms(x, alpha_bar)[0], dim=1)

    def eps(self, x_t: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
        """Exact noise prediction ``-sqrt(1 - ab) grad log q_t(x_t)`` (B, d), float64."""
        log_terms, z = self._terms(x_t, alpha_bar)
        r = torch.softmax(log_terms, dim=1)
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=z.device).reshape(-1, 1).expand(z.shape[0], 1)
        return (1.0 - ab).sqrt() * (r.unsqueeze(2) * z).sum(1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact samples (n, d), float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return self.means[k] + self.variances[k].sqrt() * z


class MixtureUNet(torch.nn.Module):
    """A diffusers-style UNet whose noise prediction is the exact one of a ``DiagonalMixture``.

    mixtures: one mixture per registered prompt embedding (``keys`` (P, L, H), matched sample by sample
    to ``encoder_hidden_states``), or a single mixture with ``keys=None`` (unconditional; then any
    ``encoder_hidden_states`` is ignored). ``sample_shape`` (C, H, W) with C*H*W the mixtures'
    dimension; ``alphas_cumprod`` the schedule that maps ``timestep`` to ``alpha_bar``.
    """

    def __init__(self, mixtures, sample_shape: tuple[int, int, int], alphas_cumprod: torch.Tensor,
                 keys: torch.Tensor | None = None, match_tol: float = 1e-4):
        super().__init__()
        mixtures = list(mixtures) if isinstance(mixtures, (list, tuple)) else [mixtures]
        d = int(torch.tensor(sample_shape).prod())
        for i, mix in enumerate(mixtures):
            if mix.dim != d:
                raise ValueError(f"mixture {i} has dimension {mix.dim}, the sample shape {tuple(sample_shape)} has {d}")
        if keys is None and len(mixtures) != 1:
            raise ValueError(f"{len(mixtures)} mixtures need keys (one prompt embedding each)")
        if keys is not None and keys.shape[0] != len(mixtures):
            raise ValueError(f"{keys.shape[0]} keys for {len(mixtures)} mixtures")
        self.mixtures = mixtures
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.register_buffer("keys", None if keys is None else keys.detach().to(torch.float32))
        self.match_tol = float(match_tol)
        # scale code asks parameters() for the device: one frozen scalar
        self._anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        c, h, _ = self.sample_shape
        self.config = SimpleNamespace(in_channels=c, out_channels=c, sample_size=h,
                                      cross_attention_dim=None if keys is None else int(keys.shape[-1]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def mixture_index(self, encoder_hidden_states: torch.Tensor | None, n: int) -> torch.Tensor:
        """Index (n,) of the registered embedding each sample's conditioning equals (within
        ``match_tol``, max abs difference); ``ValueError`` for an unknown embedding."""
        if self.keys is None:
            return torch.zeros(n, dtype=torch.long)
        if encoder_hidden_states is None:
            raise ValueError("this harness is conditional: pass encoder_hidden_states")
        e = encoder_hidden_states.detach().float().to(self.keys.device)
        dist = (e.unsqueeze(1) - self.keys.unsqueeze(0)).abs().flatten(2).amax(2)  # (n, P)
        best, idx = dist.min(1)
        if torch.any(best > self.match_tol):
            raise ValueError(f"conditioning matches no registered prompt embedding (nearest max-abs distance "
                             f"{float(best.max()):.3g} > {self.match_tol})")
        return idx.cpu()

    def eps(self, x_t: torch.Tensor, timestep: int | torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """Exact noise prediction, float64, shaped like ``x_t``."""
        n = x_t.shape[0]
        t = torch.as_tensor(timestep, device=self.alphas_cumprod.device).long().reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
        ab = self.alphas_cumprod[t]
        idx = self.mixture_index(encoder_hidden_states, n)
        out = torch.empty((n, x_t[0].numel()), dtype=torch.float64, device=x_t.device)
        flat = x_t.reshape(n, -1)
        for j in idx.unique().tolist():
            sel = (idx == j).to(x_t.device)
            out[sel] = self.mixtures[j].eps(flat[sel], ab.to(x_t.device)[sel])
        return out.reshape(x_t.shape)

    def forward(self, sample: torch.Tensor, timestep: int | torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                return_dict: bool = True, **_: object) -> SimpleNamespace | tuple[torch.Tensor]:
        """As a diffusers UNet: the exact eps in ``.sample`` (or a 1-tuple without ``return_dict``)."""
        eps = self.eps(sample, timestep, encoder_hidden_states).to(sample.dtype)
        return SimpleNamespace(sample=eps) if return_dict else (eps,)


class ExactTrainable:
    """Stands in for ``scale.models.Trainable`` with harness models: ``unet`` is the model being
    "trained" (no trainable parameters), ``reference()`` yields the frozen reference module."""

    def __init__(self, unet: MixtureUNet, reference: MixtureUNet):
        self.unet, self._ref, self.mode, self.names = unet, reference, "exact", []

    def parameters(self) -> list:
        return []

    @contextlib.contextmanager
    def reference(self) -> Iterator[MixtureUNet]:
        yield self._ref

    def state_dict(self) -> dict:
        return {}


def sd_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """Stable Diffusion v1's DDPM scheduler, built from its config (scaled-linear betas 0.00085..0.012)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({"num_train_timesteps": num_train_timesteps, "beta_schedule": "scaled_linear",
                                      "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
                                      "clip_sample": False})
