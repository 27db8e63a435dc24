"""Evaluation of unlearned models: KID / FID through torchmetrics with a configurable feature
extractor, CLIP score from a local CLIP model, classifier accuracy on the unlearned concept, and
nearest-neighbour copy similarity to forget images (SSCD when its TorchScript weights are given).

Nothing here downloads: the Inception extractor needs torch-fidelity *and* a local weights file,
CLIP needs a local model folder, SSCD a local TorchScript file; otherwise a ``ValueError`` says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


class FeatureExtractor(nn.Module):
    """Adapter giving torchmetrics a custom feature network: float images in [-1, 1] (N, C, H, W)
    -> (N, num_features) float32 features (``num_features`` is what torchmetrics asks for)."""

    def __init__(self, net: nn.Module, num_features: int, resize: int | None = None):
        super().__init__()
        self.net = net.eval()
        self.num_features = int(num_features)
        self.resize = resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.resize is not None and x.shape[-1] != self.resize:
            x = torch.nn.functional.interpolate(x, size=(self.resize, self.resize), mode="bilinear",
                                                align_corners=False)
        with torch.no_grad():
            return self.net(x).float().flatten(1)


def load_feature_extractor(spec: str) -> FeatureExtractor:
    """``torchscript:PATH`` (any TorchScript image model, e.g. SSCD or a CLIP image tower) or
    ``inception:PATH`` (torch-fidelity's Inception with local weights). Never downloads."""
    kind, _, path = spec.partition(":")
    if kind not in ("torchscript", "inception"):
        raise ValueError(f"feature extractor must be 'torchscript:PATH' or 'inception:PATH', got {spec!r}")
    if not path or not Path(path).is_file():
        raise ValueError(f"feature extractor weights {path!r} are not available locally; Inception/CLIP/SSCD "
                         "weights cannot be downloaded here — give a local file")
    if kind == "torchscript":
        net = torch.jit.load(path, map_location="cpu").eval()
        with torch.no_grad():
            nf = net(torch.zeros(1, 3, 224, 224)).flatten(1).shape[1]
        return FeatureExtractor(net, nf)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=path)
    except (ModuleNotFoundError, ImportError) as exc:
        raise ValueError(f"the Inception feature extractor needs torch-fidelity, which is not usable here: {exc}") from exc

    class _U8(nn.Module):
        def forward(self, x):
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            return net(((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8))

    return FeatureExtractor(_U8(), 2048)


def kid(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module, subset_size: int = 50, subsets: int = 50,
        seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) with torchmetrics and a custom feature network; seeded subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    k = min(subset_size, real.shape[0], fake.shape[0])
    if k < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated images, got {real.shape[0]}, {fake.shape[0]}")
    metric = KernelInceptionDistance(feature=feature, subsets=subsets, subset_size=k)
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def fid(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature)
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    return float(metric.compute())


class _TensorFeatures(nn.Module):
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return the projected
    embedding tensor: transformers >= 5 returns an output object there, which torchmetrics'
    CLIPScore (1.9) then tries to normalise as a tensor and fails."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score(images_uint8: torch.Tensor, prompts: list[str], clip_path: str) -> float:
    """torchmetrics CLIPScore with a *local* CLIP model folder (no download is attempted).

    torchmetrics aggregates as ``max(mean_i 100 cos(E_image_i, E_text_i), 0)``: the clamp of
    Hessel et al.'s per-sample ``max(100 cos, 0)`` is applied to the batch mean. The two agree
    whenever no cosine is negative, which real CLIP models give for image-caption pairs; score
    images one at a time for the per-sample definition."""
    if not clip_path or not Path(clip_path).is_dir():
        raise ValueError(f"CLIP model path {clip_path!r} is not a local folder; CLIP weights cannot be downloaded here")
    from torchmetrics.multimodal.clip_score import CLIPScore

    def load_local():
        from transformers import CLIPModel, CLIPProcessor
        return _TensorFeatures(CLIPModel.from_pretrained(clip_path)), CLIPProcessor.from_pretrained(clip_path)

    try:  # torchmetrics >= 1.8 accepts only hub names it knows, or a loader callable
        metric = CLIPScore(model_name_or_path=load_local)
    except (TypeError, OSError, AttributeError):  # older torchmetrics: any from_pretrained path
        metric = CLIPScore(model_name_or_path=clip_path)
    imgs = images_uint8.permute(0, 3, 1, 2) if images_uint8.shape[-1] in (1, 3) else images_uint8
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    with torch.no_grad():
        return float(metric(imgs, list(prompts)))


def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` that ``classifier`` assigns to ``labels``."""
    with torch.no_grad():
        pred = classifier(images.float()).argmax(1)
    return float((pred == labels.to(pred.device)).float().mean())


def nearest_neighbour_similarity(generated: torch.Tensor, references: torch.Tensor,
                                 feature: nn.Module | None = None) -> dict:
    """For every reference (forget) image, its nearest generated image: the L2 distance in pixel
    space and, with a feature network (SSCD), the cosine similarity of normalised descriptors (the
    copy-detection score). Returns lists aligned with ``references``."""
    g = generated.float().flatten(1)
    r = references.float().flatten(1)
    d = torch.cdist(r, g)
    out = {"nn_l2": d.min(1).values.tolist(), "nn_index": d.argmin(1).tolist()}
    if feature is not None:
        fg = nn.functional.normalize(feature(generated.float()), dim=1)
        fr = nn.functional.normalize(feature(references.float()), dim=1)
        out["nn_cosine"] = (fr @ fg.T).max(1).values.tolist()
    return out


@dataclass(frozen=True)
class EvaluateConfig:
    samples: str = ""          # samples.npz from `dualunlearn scale sample`
    real_dir: str = ""         # folder of real (retain) images for KID/FID
    forget_dir: str = ""       # folder of forget images for copy similarity
    feature: str = ""          # torchscript:PATH | inception:PATH (KID/FID/SSCD features)
    clip_model: str = ""       # local CLIP folder for CLIP score
    classifier: str = ""       # torchscript:PATH, logits of images in [-1, 1] (N, C, H, W)
    concept_label: int = -1    # the classifier's label of the unlearned concept
    kid_subset_size: int = 50
    fid: bool = False
    seed: int = 0
    out: str = "runs/evaluate"

    def __post_init__(self):
        if not self.samples:
            raise ValueError("samples (a samples.npz written by `dualunlearn scale sample`) is required")


def _folder_images(folder: str) -> torch.Tensor:
    from scale.data import list_images
    from PIL import Image

    arrs = []
    for f in list_images(folder):
        with Image.open(f) as im:
            a = np.asarray(im)
        arrs.append(a[:, :, None] if a.ndim == 2 else a)
    return torch.from_numpy(np.stack(arrs).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0


def run(cfg: EvaluateConfig) -> dict:
    """Compute the metrics the config asks for; write ``metrics.json`` into ``cfg.out``."""
    path = Path(cfg.samples)
    if not path.is_file():
        raise ValueError(f"samples file {cfg.samples!r} does not exist")
    data = np.load(path)
    u8 = torch.from_numpy(data["images"])
    fake = u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    prompts = [str(p) for p in data["prompts"]]
    feature = load_feature_extractor(cfg.feature) if cfg.feature else None
    res: dict = {"num_samples": int(fake.shape[0])}
    if cfg.real_dir:
        if feature is None:
            raise ValueError("KID/FID need a feature extractor: set feature='torchscript:PATH' or 'inception:PATH'")
        real = _folder_images(cfg.real_dir)
        res["kid_mean"], res["kid_std"] = kid(real, fake, feature, cfg.kid_subset_size, seed=cfg.seed)
        if cfg.fid:
            res["fid"] = fid(real, fake, feature)
    if cfg.forget_dir:
        res["copy"] = nearest_neighbour_similarity(fake, _folder_images(cfg.forget_dir), feature)
    if cfg.clip_model:
        res["clip_score"] = clip_score(u8, prompts, cfg.clip_model)
    if cfg.classifier:
        kind, _, cpath = cfg.classifier.partition(":")
        if kind != "torchscript" or not Path(cpath).is_file():
            raise ValueError(f"classifier must be 'torchscript:PATH' of a local file, got {cfg.classifier!r}")
        if cfg.concept_label < 0:
            raise ValueError("concept_label (the classifier's label of the unlearned concept) is required")
        clf = torch.jit.load(cpath, map_location="cpu").eval()
        # fraction of generated images still classified as the unlearned concept
        res["concept_rate"] = classifier_accuracy(clf, fake, torch.full((fake.shape[0],), cfg.concept_label))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(res, indent=2))
    return res
