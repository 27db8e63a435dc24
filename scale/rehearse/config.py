"""The rehearsal's configuration: its prompt, size presets and ``RehearseConfig``."""

from __future__ import annotations

from dataclasses import dataclass

from scale.names import CONCEPT_METHODS, DATA_METHODS, canonical_method

PROMPT = "a photo of the digit {}"
SIZES = ("tiny", "quick", "full")
#: the methods a rehearsal can run: concept unlearning of one digit, data unlearning of a few images
METHODS = CONCEPT_METHODS + DATA_METHODS
#: size presets: pretraining steps of the conditional UNet (``pretrain_steps``, batch ``batch``, learning
#: rate schedule ``lr_schedule``) and of the unconditional DDPM (``uncond_steps``); unlearning steps
#: (concept ``unlearn_steps``, data ``data_unlearn_steps``); generated images per digit for evaluation;
#: UNet widths; prompt length in tokens (``prompt_tokens``: the tokenizer's ``model_max_length``);
#: the frozen random text encoder's ``text_init_scale`` (``builders.build_text_encoder``);
#: ancestral sampler steps of the concept runs' on-policy states and path-KL estimate
#: (``unlearn_sample_steps``) and of evaluation (``eval_sample_steps``, unless
#: ``RehearseConfig.sample_steps > 0``); RU's dual step ``reverse_kl_lr_dual`` (unless
#: ``RehearseConfig.reverse_kl_lr_dual > 0``), larger for fewer unlearning steps.
#: ``tiny`` is the default-test size (docs/scale.md "Offline rehearsal": why it learns the
#: conditioning in 600 steps where a 400-step one-cycle run did not); ``quick`` pretrains with the same
#: recipe (text-encoder ``init_scale`` 5, 8-token prompts, warmup-stable-decay) for longer: with
#: ``init_scale`` 1 its seed-0 model could not be unlearned in 60 steps (docs/scale.md, quick size).
#: ``full`` conditions the same way (its old recipe, ``init_scale`` 1 with 16-token prompts, puts
#: 0.6% of the prompt-embedding energy between digits at seed 0, as the quick size that failed);
#: ``tests/test_scale_rehearse.py`` checks every preset's text encoder separates the ten prompts.
PRESETS = {
    "tiny": dict(pretrain_steps=600, uncond_steps=600, unlearn_steps=40, eval_per_class=32,
                 channels=(16, 32), mid_block=True, batch=64, data_train_size=32, data_unlearn_steps=200,
                 lr_schedule="wsd", prompt_tokens=8, text_init_scale=5.0, unlearn_sample_steps=10,
                 eval_sample_steps=15, reverse_kl_lr_dual=0.008),
    "quick": dict(pretrain_steps=1500, uncond_steps=600, unlearn_steps=60, eval_per_class=32,
                  channels=(16, 32), mid_block=True, batch=64, data_train_size=32, data_unlearn_steps=200,
                  lr_schedule="wsd", prompt_tokens=8, text_init_scale=5.0, unlearn_sample_steps=25,
                  eval_sample_steps=25, reverse_kl_lr_dual=0.002),
    "full": dict(pretrain_steps=20000, uncond_steps=15000, unlearn_steps=400, eval_per_class=400,
                 channels=(32, 64), mid_block=True, batch=128, data_train_size=256, data_unlearn_steps=600,
                 lr_schedule="wsd", prompt_tokens=8, text_init_scale=5.0, unlearn_sample_steps=25,
                 eval_sample_steps=25, reverse_kl_lr_dual=0.002),
}
#: the preset entries that determine the pretrained models (the cache fingerprint)
PRETRAIN_KEYS = ("pretrain_steps", "uncond_steps", "channels", "mid_block", "batch", "data_train_size",
                 "lr_schedule", "prompt_tokens", "text_init_scale")


@dataclass(frozen=True)
class RehearseConfig:
    out: str = "runs/rehearse"
    size: str = "quick"
    seed: int = 0
    digit: int = 3
    methods: tuple[str, ...] = ("reverse_kl", "likelihood", "esd", "forward_kl", "siss")
    timesteps: int = 100
    sample_steps: int = 0
    guidance: float = 3.0
    reverse_kl_budget_factor: float = 1.0
    likelihood_budget: float = -0.5
    likelihood_constraint: str = "log_likelihood_ratio"
    esd_eta: float = 1.0
    lr: float = 1e-3
    unlearn_lr: float = 3e-3
    lora_targets: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")
    reverse_kl_lr_dual: float = 0.0
    likelihood_lr_dual: float = 0.1
    data_forget_images: int = 4
    forward_kl_gap_fraction: float = 0.1
    forward_kl_budget_factor: float = 0.0
    data_lr: float = 5e-4
    forward_kl_lr_dual: float = 2.0
    data_forget_draws: int = 16
    data_eval_draws: int = 500
    lora_rank: int = 4
    retain_weight: float = 9.0
    retain_null: bool = False
    reuse_pretrained: bool = True

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if not 0 <= self.digit <= 9:
            raise ValueError(f"digit must be 0..9, got {self.digit}")
        object.__setattr__(self, "methods", tuple(canonical_method(m, METHODS, "each rehearsal method")
                                                   for m in self.methods))
        if self.sample_steps < 0:
            raise ValueError(f"sample_steps must be >= 0 (0: the size preset's), got {self.sample_steps}")
        if self.reverse_kl_lr_dual < 0:
            raise ValueError(f"reverse_kl_lr_dual must be >= 0 (0: the size preset's), got {self.reverse_kl_lr_dual}")
        if self.forward_kl_gap_fraction < 0 or self.forward_kl_budget_factor < 0:
            raise ValueError(f"forward_kl_gap_fraction and forward_kl_budget_factor must be >= 0, got "
                             f"{self.forward_kl_gap_fraction}, {self.forward_kl_budget_factor}")
        if self.data_eval_draws < 2 or self.data_forget_draws < 1:
            raise ValueError(f"data_eval_draws must be >= 2 and data_forget_draws >= 1, got "
                             f"{self.data_eval_draws}, {self.data_forget_draws}")

    @property
    def preset(self) -> dict:
        return PRESETS[self.size]

    @property
    def eval_sample_steps(self) -> int:
        return self.sample_steps or self.preset["eval_sample_steps"]
