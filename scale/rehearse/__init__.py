"""``dualunlearn scale rehearse``: the whole scale path, offline, on real data shipped with
scikit-learn (the 1,797 handwritten 8x8 digits).

1. train a digits classifier (features for KID, accuracy of generated images);
2. train from scratch a text-conditioned ``UNet2DConditionModel`` in pixel space ("a photo of the
   digit 3", a tiny CLIP text encoder built from config, a word-level tokenizer built here, prompt
   dropout so the null prompt is the unconditional model) and an unconditional ``UNet2DModel`` on
   a subset of the digits written to a PNG folder; save both in the diffusers layouts;
3. unlearn one digit with RU primal-dual, LU primal-dual and the ESD baseline
   (``scale.concept.run``: the Stable Diffusion code path, loading by ``from_pretrained``) and a
   handful of training images with FU primal-dual and SISS (``scale.data.run``: the CelebA-HQ path);
4. evaluate before/after: classifier accuracy on generated images of the unlearned and retained
   digits, KID with the classifier's features, the multipliers against their budgets, the forget
   images' denoising loss and the nearest-neighbour distance of generated images to them.

``size="tiny"`` (the default test) takes about 4 minutes on one CPU thread, pretraining included;
``size="quick"`` several minutes more (pretraining 1,500 steps is most of it; with cached pretrained
models RU / LU / ESD together take 1 to 2 minutes); ``size="full"`` is the quality run.

Modules: ``config`` (presets, ``RehearseConfig``), ``digits`` (data, classifier), ``pretrain`` (the
two models from scratch), ``evaluation`` (before/after measurements), ``report`` (``report.md``,
verdicts), ``runner`` (``run``: the whole rehearsal).
"""

from scale.rehearse.config import PRESETS, PRETRAIN_KEYS, PROMPT, SIZES, RehearseConfig
from scale.rehearse.digits import DigitClassifier, DigitFeatures, load_digits_tensor, to_pixels, train_classifier
from scale.rehearse.evaluation import (evaluate_concept, evaluate_ddpm, fixed_draw_losses, forward_kl_budgets,
                                       kid_standard_error, memorisation_gap)
from scale.rehearse.pretrain import lr_schedule, pretrain_concept_model, pretrain_ddpm
from scale.rehearse.report import VERDICT_RULES, method_verdict, render_report
from scale.rehearse.runner import calibrate_reverse_kl_budget, run

__all__ = ["PRESETS", "PRETRAIN_KEYS", "PROMPT", "SIZES", "RehearseConfig", "DigitClassifier", "DigitFeatures",
           "load_digits_tensor", "to_pixels", "train_classifier", "evaluate_concept", "evaluate_ddpm",
           "fixed_draw_losses", "forward_kl_budgets", "kid_standard_error", "memorisation_gap", "lr_schedule",
           "pretrain_concept_model", "pretrain_ddpm", "VERDICT_RULES", "method_verdict", "render_report",
           "calibrate_reverse_kl_budget", "run"]
