"""The full run's step time, wall time and memory, projected from the pre-flight's measured steps."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from scale.concept import ConceptConfig
    from scale.data import DataConfig

def unet_evals_per_step(kind: str, cfg: ConceptConfig | DataConfig, m_forget: int = 1) -> float:
    """UNet image-evaluations of one optimizer step over all processes (a backward counted as two
    forwards). Concept: per image the on-policy chain (counted as ``S - 1`` steps: a micro-batch runs to
    its latest stop), ``1 + m`` reference evaluations and one trained forward + backward, the same again
    for the retain states when there are retain prompts, and ``K (1 + m)`` diffusion-classifier
    evaluations for LU. Data: forward + backward of every training image and, for FU/SISS, of the
    ``m K`` forget draws."""
    B = cfg.train.batch_size
    if kind == "concept":
        S, m = cfg.sample_steps, len(cfg.concepts)
        per_image = (S - 1) + (1 + m) + 3
        if cfg.retain_prompts:
            per_image += (S - 1) + 1 + 3
        if cfg.method == "likelihood":
            per_image += cfg.classifier_draws * (1 + m)
        return float(B * per_image)
    m = m_forget
    if cfg.method == "siss_is":
        return 3.0 * B
    return 3.0 * (B + m * cfg.forget_draws)


@dataclass(frozen=True)
class Projection:
    step_seconds: float
    wall_seconds: float
    memory_mib: float
    assumption: str


def project_run(*, step_seconds: float, evals_measured: float, evals_full: float, pixels_measured: int,
                pixels_full: int, processes: int, steps_full: int, mem_base_mib: float, mem_fixed_mib: float,
                mem_peak_mib: float, micro_measured: int, micro_full: int) -> Projection:
    """The full run's step time, wall time and peak memory per process from one measured configuration.

    Assumptions (stated in the report): a step's time is proportional to the UNet image-evaluations
    each process does (``evals / processes``) times the pixels per image, so
    ``t_full = t * (evals_full / processes * pixels_full) / (evals_measured * pixels_measured)`` and the
    wall time is ``steps_full * t_full`` (no data-parallel overhead); peak memory is a fixed part
    (``mem_base``: the process before loading; ``mem_fixed``: parameters, gradients and optimizer state)
    plus activations proportional to the micro-batch times the pixels, measured as
    ``max(0, peak - base - fixed)``.
    """
    if min(step_seconds, evals_measured, evals_full, pixels_measured, pixels_full, processes,
           micro_measured, micro_full) <= 0:
        raise ValueError(f"projection inputs must be positive, got step_seconds={step_seconds}, "
                         f"evals={evals_measured}/{evals_full}, pixels={pixels_measured}/{pixels_full}, "
                         f"processes={processes}, micro-batch={micro_measured}/{micro_full}")
    t_full = step_seconds * (evals_full / processes * pixels_full) / (evals_measured * pixels_measured)
    act = max(0.0, mem_peak_mib - mem_base_mib - mem_fixed_mib)
    mem = mem_base_mib + mem_fixed_mib + act * (micro_full * pixels_full) / (micro_measured * pixels_measured)
    text = ("step time proportional to UNet image-evaluations per process x pixels per image; wall time = "
            "steps x step time (no data-parallel overhead); memory = fixed (process, parameters, gradients, "
            "optimizer state) + activations proportional to micro-batch x pixels")
    return Projection(t_full, t_full * steps_full, mem, text)


class PeakMemory:
    """Peak memory (MiB) of the code inside the context: CUDA max allocated on a GPU, else the process's
    resident set size sampled every 20 ms."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def current(device: str) -> float:
        if device == "cuda":
            return torch.cuda.memory_allocated() / 2 ** 20
        import psutil

        return psutil.Process().memory_info().rss / 2 ** 20

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current("cpu"))
            self._stop.wait(0.02)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._t = threading.Thread(target=self._watch, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self.current("cpu"))
        return False
