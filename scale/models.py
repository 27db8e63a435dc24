"""Loading diffusers models from a path or hub id, with clear errors before any training, and the
trainable parameters of an unlearning run (docs/math.md §6: LoRA on the cross-attention layers, ESD-x).

The frozen pretrained model is never a second copy of the UNet: with LoRA the reference is the
same UNet with its adapters disabled; with full cross-attention fine-tuning only the original
``attn2`` tensors are kept and swapped in (``Trainable.reference()``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from toy.core.seeding import derive_seed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: ESD-x: the cross-attention projections of every transformer block.
ESD_X_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.count("/") != 1


def resolve_model_location(path_or_id: str, what: str = "model") -> tuple[str, bool]:
    """Return ``(location, is_local)``; raise ``ValueError`` for a missing path or a local folder
    that is not a diffusers model (neither ``model_index.json`` nor ``config.json``)."""
    if not path_or_id or not str(path_or_id).strip():
        raise ValueError(f"{what} path is empty")
    s = str(path_or_id)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{what} path {s!r} is a file, not a diffusers model folder")
        if not ((p / "model_index.json").is_file() or (p / "config.json").is_file()):
            raise ValueError(f"{what} path {s!r} is not a diffusers model: it has neither model_index.json "
                             f"nor config.json")
        return str(p), True
    if _looks_like_path(s):
        raise ValueError(f"{what} path {s!r} does not exist")
    return s, False


def _hub_unreachable(repo_id: str) -> str | None:
    """``None`` when the hub answers for ``repo_id``; otherwise why not (one line). One request with
    a 5 s timeout, instead of the download's retries."""
    try:
        from huggingface_hub import model_info

        model_info(repo_id, timeout=5)
    except Exception as exc:  # noqa: BLE001 -- any failure to reach the hub is reported the same way
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _load(cls, location: str, subfolder: str | None, local_files_only: bool, what: str,
          is_local: bool = True):
    kwargs = {"local_files_only": local_files_only}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if not is_local and not local_files_only:
        try:  # the local cache first: a cached hub model loads offline
            return cls.from_pretrained(location, **(kwargs | {"local_files_only": True}))
        except (OSError, ValueError, KeyError, TypeError):
            why = _hub_unreachable(location)
            if why is not None:
                raise ValueError(f"{what} {location!r} is not a local folder; downloading from the hub failed: "
                                 f"{why}; pass a local path or set `local_files_only`") from None
    try:
        return cls.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        where = f"{location!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise ValueError(f"could not load the {what} from {where}: {exc}") from exc


def _check_epsilon(scheduler, location: str) -> None:
    pred = scheduler.config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(f"the scheduler of {location!r} predicts {pred!r}; only 'epsilon' models are supported")


_SAMPLE_SIZE_OVERRIDE: list[int] = []


@contextlib.contextmanager
def sample_size_override(size: int | None) -> Iterator[None]:
    """Inside this context every model bundle's ``sample_shape`` has spatial size ``size`` instead of
    the UNet's configured ``sample_size`` (the pre-flight's reduced resolution on CPU; diffusers
    UNets take any size divisible by ``min_sample_size``). ``None`` changes nothing."""
    if size is None:
        yield
        return
    _SAMPLE_SIZE_OVERRIDE.append(int(size))
    try:
        yield
    finally:
        _SAMPLE_SIZE_OVERRIDE.pop()


def min_sample_size(unet: torch.nn.Module) -> int:
    """The smallest spatial size the UNet accepts: ``2 ** (number of downsampling blocks)``."""
    n = sum(1 for b in getattr(unet, "down_blocks", []) if getattr(b, "downsamplers", None))
    return 2 ** n


class _UNetAndScheduler:
    """What both model bundles derive from their UNet and DDPM scheduler."""

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float64)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        s = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        if _SAMPLE_SIZE_OVERRIDE:
            s = _SAMPLE_SIZE_OVERRIDE[-1]
        return (c.in_channels, s, s)


@dataclass
class ConceptModels(_UNetAndScheduler):
    """The parts of a text-to-image latent (or pixel) diffusion model used by concept unlearning."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module | None
    scheduler: object
    location: str

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0


def load_concept_models(path_or_id: str, local_files_only: bool = False) -> ConceptModels:
    """Load UNet2DConditionModel, text encoder, tokenizer, optional VAE and DDPM scheduler of a
    Stable-Diffusion-layout folder or hub id (``model_index.json`` with subfolders). A missing
    ``vae`` means a pixel-space model (used by the offline rehearsal)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    location, is_local = resolve_model_location(path_or_id, "concept model")
    if is_local and not (Path(location) / "model_index.json").is_file():
        raise ValueError(f"concept model path {location!r} is not a diffusers pipeline folder "
                         f"(no model_index.json with unet/, text_encoder/, tokenizer/, scheduler/)")
    unet = _load(UNet2DConditionModel, location, "unet", local_files_only, "UNet", is_local)
    text_encoder = _load(CLIPTextModel, location, "text_encoder", local_files_only, "text encoder", is_local)
    tokenizer = _load(AutoTokenizer, location, "tokenizer", local_files_only, "tokenizer", is_local)
    scheduler = _load(DDPMScheduler, location, "scheduler", local_files_only, "scheduler", is_local)
    _check_epsilon(scheduler, location)
    vae = None
    if not is_local or (Path(location) / "vae").is_dir():
        vae = _load(AutoencoderKL, location, "vae", local_files_only, "VAE", is_local)
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(f"text encoder width {text_encoder.config.hidden_size} does not match the UNet's "
                         f"cross_attention_dim {unet.config.cross_attention_dim}")
    for m in (unet, text_encoder, vae):
        if m is not None:
            m.requires_grad_(False).eval()
    return ConceptModels(unet, text_encoder, tokenizer, vae, scheduler, location)


@dataclass
class DDPMModels(_UNetAndScheduler):
    unet: torch.nn.Module
    scheduler: object
    location: str



def load_ddpm_models(path_or_id: str, local_files_only: bool = False) -> DDPMModels:
    """Load ``UNet2DModel`` + ``DDPMScheduler`` from a model folder (``config.json`` and
    ``scheduler_config.json`` at the root, as ``google/ddpm-celebahq-256``) or a pipeline folder
    (``unet/`` and ``scheduler/`` subfolders)."""
    from diffusers import DDPMScheduler, UNet2DModel

    location, is_local = resolve_model_location(path_or_id, "DDPM model")
    sub = "unet" if is_local and (Path(location) / "unet").is_dir() else None
    unet = _load(UNet2DModel, location, sub, local_files_only, "UNet2DModel", is_local)
    scheduler = _load(DDPMScheduler, location, "scheduler" if sub else None, local_files_only, "scheduler", is_local)
    _check_epsilon(scheduler, location)
    unet.requires_grad_(False).eval()
    return DDPMModels(unet, scheduler, location)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, prompts: list[str], check_nonempty: bool = True) -> torch.Tensor:
    """Token ids -> text-encoder hidden states (float32), with a clear error for a prompt that
    tokenizes to nothing but special tokens (e.g. an empty prompt, or only out-of-vocabulary words)."""
    max_len = int(getattr(tokenizer, "model_max_length", 77))
    if max_len > 10_000:  # tokenizers without a limit report a huge sentinel
        max_len = int(text_encoder.config.max_position_embeddings)
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="pt")["input_ids"]
    if check_nonempty:
        special = set(getattr(tokenizer, "all_special_ids", []))
        for prompt, row in zip(prompts, ids.tolist()):
            if not any(i not in special for i in row):
                raise ValueError(f"concept prompt {prompt!r} tokenizes to nothing (only special/unknown tokens)")
    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        return text_encoder(ids.to(device))[0].float()


class Trainable:
    """The trainable parameters of an unlearning run and a context for the frozen reference.

    ``mode="lora"``: peft LoRA adapters (rank ``rank``) on modules whose names end with one of
    ``targets``; ``reference()`` disables the adapters. ``mode="attn2"``: full fine-tuning of every
    parameter under a module whose name ends with ``.attn2``; the originals are kept (only those
    tensors) and swapped in by ``reference()``. ``mode="full"``: every UNet parameter (DDPM data
    unlearning; no reference is needed there, and ``reference()`` raises).
    """

    MODES = ("lora", "attn2", "full")

    def __init__(self, unet: torch.nn.Module, mode: str = "lora", rank: int = 4, alpha: float | None = None,
                 targets: Sequence[str] = ESD_X_TARGETS, seed: int = 0):
        if mode not in self.MODES:
            raise ValueError(f"trainable mode must be one of {self.MODES}, got {mode!r}")
        self.unet = unet
        self.mode = mode
        unet.requires_grad_(False)
        self._originals: dict[str, torch.Tensor] = {}
        if mode == "lora":
            from peft import LoraConfig

            if rank < 1:
                raise ValueError(f"LoRA rank must be >= 1, got {rank}")
            names = [n for n, _ in unet.named_modules() if any(n.endswith(t) for t in targets)]
            if not names:
                raise ValueError(f"no module of the UNet matches the LoRA targets {list(targets)}")
            torch.manual_seed(derive_seed(seed, "lora-init"))  # peft initialises lora_A from the global generator
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets),
                                        init_lora_weights=True))
        elif mode == "attn2":
            for n, p in unet.named_parameters():
                if ".attn2." in n:
                    p.requires_grad_(True)
                    self._originals[n] = p.detach().clone()
            if not self._originals:
                raise ValueError("the UNet has no cross-attention (attn2) layers to fine-tune")
        else:
            unet.requires_grad_(True)
        self.names = [n for n, p in unet.named_parameters() if p.requires_grad]

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the run trains (``requires_grad``)."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """Run the pretrained (frozen) model inside this context, without a second UNet."""
        if self.mode == "lora":
            self.unet.disable_adapters()
            try:
                yield self.unet
            finally:
                self.unet.enable_adapters()
        elif self.mode == "attn2":
            params = dict(self.unet.named_parameters())
            current = {n: params[n].data for n in self._originals}
            try:
                for n, orig in self._originals.items():
                    params[n].data = orig
                yield self.unet
            finally:
                for n, cur in current.items():
                    params[n].data = cur
        else:
            raise ValueError("full fine-tuning keeps no reference model")

    def state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.unet.named_parameters())
        return {n: params[n].detach().to("cpu").contiguous() for n in self.names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.unet.named_parameters())
        missing = sorted(set(self.names) - set(state))
        unexpected = sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise ValueError(f"trainable weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(state[n].to(params[n]))
