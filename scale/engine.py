"""The training loop every scale run shares: accelerate (DDP, bf16/fp16), gradient accumulation over
micro-batches, the dual step on constraint estimates averaged across processes, atomic checkpoints
and exact resume.

Determinism contract. Every random draw of optimizer step ``s`` comes from
``step_generator(seed, s)`` (a named stream of the run seed, ``toy.core.seeding``) and is drawn
for the *global* batch, then sliced: slice ``k = accum_index * world + rank`` of ``world * accum``
slices. A run on one process and a run on
two processes with the same global batch therefore see the same samples, noise and timesteps, and
a resumed run draws exactly what the uninterrupted run drew. Each step function returns its
slice's share of the global-batch objective (terms already divided by the global sizes) and the
sums and counts of its constraint estimates; the loop multiplies the loss by ``world`` (DDP
averages gradients across ranks) and sums estimates across slices and processes before the dual
step, so every rank applies the same dual update to the same multipliers.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from toy.core.dual import DualState
from toy.core.runs import CheckpointStore, RunDir, announce
from toy.core.seeding import seeded_generator

if TYPE_CHECKING:
    from accelerate import Accelerator

    from scale.exact import ExactTrainable
    from scale.models import Trainable

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Primal optimisation. ``batch_size`` is global (all processes, all micro-batches) per
    optimizer step; ``micro_batch`` is one forward's size per process; the number of accumulated
    micro-batches is ``ceil(batch_size / (micro_batch * processes))``."""

    steps: int = 100
    batch_size: int = 4
    micro_batch: int = 4
    lr: float = 1e-4
    optimizer: str = "adam"
    max_grad_norm: float = 0.0
    mixed_precision: str = "no"
    cpu: bool = False
    checkpoint_every: int = 50
    seed: int = 0
    sample_every: int = 0
    log_with: str = ""

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"train.steps must be >= 0, got {self.steps}")
        if self.batch_size < 1 or self.micro_batch < 1:
            raise ValueError(f"train.batch_size and train.micro_batch must be >= 1, got "
                             f"{self.batch_size}, {self.micro_batch}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.sample_every < 0:
            raise ValueError(f"train.sample_every must be >= 0 (0: pictures at the end only), got {self.sample_every}")
        if self.log_with not in ("", "tensorboard", "wandb"):
            raise ValueError(f"train.log_with must be '', 'tensorboard' or 'wandb', got {self.log_with!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the paper's choice) or plain SGD (whose update is linear in the gradient, so runs that
    differ only in float summation order stay comparable)."""
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.Adam(params, lr=cfg.lr)


def step_generator(seed: int, step: int, stream: str = "batch") -> torch.Generator:
    """The CPU generator of optimizer step ``step``: ``seeded_generator(seed, f"step{step}:{stream}")``,
    one independent stream per purpose (``"batch"``: the step's draws; ``"retain"``: a concept run's
    retain states)."""
    return seeded_generator(int(seed), f"step{int(step)}:{stream}")


@dataclass(frozen=True)
class Slice:
    """Slice ``index`` of ``count`` equal shares of every global array of a step."""

    index: int
    count: int

    def bounds(self, n: int) -> tuple[int, int]:
        return n * self.index // self.count, n * (self.index + 1) // self.count

    def take(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds(x.shape[0])
        return x[lo:hi]


@dataclass
class StepOut:
    """A step function's result for one slice: ``loss`` its share of the global objective (or
    ``None`` for a dual-only step), sums and counts of the m constraint estimates, and sums of
    extra metrics (divided by their global sizes already)."""

    loss: torch.Tensor | None
    measured_sum: torch.Tensor
    measured_count: torch.Tensor
    extras: dict[str, float] = field(default_factory=dict)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """A fresh ``Accelerator`` for one run. accelerate keeps its mixed-precision setting in a
    process-wide singleton; runs executed one after another in one process (tests, the rehearsal)
    may differ in it, so that part is cleared (the process group, if any, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, trainable_state: dict[str, torch.Tensor], state: dict) -> None:
    """Write ``trainable.safetensors`` + ``state.pt`` + ``manifest.json`` (checksums) into a fresh
    folder and swap it in by renames, keeping the previous checkpoint in ``<path>.prev``
    (``toy.core.runs.CheckpointStore``: the toy tier's checkpoints are the same)."""
    CheckpointStore(path).save(state, trainable_state)


def load_checkpoint(path: Path, repair: bool = True) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(trainable weights, state)`` of the newest checkpoint under ``path`` that passes its checksums
    (the previous one, with a warning, when the newest is damaged); ``None`` when there is none.
    ``repair`` only in the process that writes checkpoints (``CheckpointStore.load``)."""
    loaded = CheckpointStore(path).load(repair)
    if loaded is None:
        return None
    state, tensors = loaded
    return tensors or {}, state


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ---------------------------------------------------------------- the loop


def run_loop(*, run_dir: RunDir, accelerator: Accelerator, model: torch.nn.Module,
             trainable: Trainable | ExactTrainable, optimizer: torch.optim.Optimizer, dual: DualState,
             step_fn: Callable[[int, Slice], StepOut], cfg: TrainConfig, total_steps: int,
             dual_active: Callable[[int], bool] = lambda s: True, resume: bool = False,
             desc: str = "unlearn", stop_after: int | None = None,
             snapshot: Callable[[int], object] | None = None) -> dict:
    """Run optimizer steps ``[start, total_steps)``; return the last step's measured values.

    ``stop_after`` ends the loop after that many steps (simulates a killed run in tests).
    ``snapshot(step)`` (``scale.figures``) is called on the main process before the first step, every
    ``cfg.sample_every`` steps and after the last; with ``cfg.log_with`` the per-step metrics also go
    to accelerate's tracker (logs under ``<run>/tracker``).
    """
    world = accelerator.num_processes
    accum = max(1, math.ceil(cfg.batch_size / (cfg.micro_batch * world)))
    ckpt_path = run_dir.checkpoint_path
    start = 0
    last: dict = {}
    if resume:
        ck = load_checkpoint(ckpt_path, repair=accelerator.is_main_process)
        if ck is not None:
            weights, state = ck
            trainable.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            dual.load_state_dict(state["dual"])
            _set_rng_state(state["rng"])
            start = int(state["step"])
            last = state.get("last", {})
    if accelerator.is_main_process:
        run_dir.begin(start, total_steps, desc, restart=not resume)
        if resume and not run_dir.continued:
            announce("nothing to resume in %s: starting %s at step 0 of %d", run_dir.path, desc, total_steps)
    params = trainable.parameters()
    pictures = snapshot is not None and accelerator.is_main_process
    if pictures:
        snapshot(start)
    if cfg.log_with:  # the tracker's directory is the run's, known only here
        from accelerate.tracking import filter_trackers

        accelerator.project_configuration.set_directories(str(run_dir.path))
        accelerator.project_configuration.logging_dir = str(run_dir.path / "tracker")
        accelerator.log_with = filter_trackers([cfg.log_with], accelerator.logging_dir)
        accelerator.init_trackers("dualunlearn", config={"lr": cfg.lr, "batch_size": cfg.batch_size,
                                                         "steps": total_steps, "seed": cfg.seed})
    done = 0
    bar = tqdm(range(start, total_steps), desc=desc, unit="step", disable=not accelerator.is_main_process,
               initial=start, total=total_steps)
    with DeferredInterrupt(enabled=world == 1) as interrupt:  # Ctrl-C: checkpoint this step, then stop
        for step in bar:
            t_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            meas_sum = torch.zeros(dual.budgets.numel(), dtype=torch.float64)
            meas_cnt = torch.zeros_like(meas_sum)
            loss_sum = torch.zeros((), dtype=torch.float64)
            extras: dict[str, float] = {}
            primal = False
            for k in range(accum):
                sl = Slice(k * world + accelerator.process_index, accum * world)
                sync = accelerator.no_sync(model) if k < accum - 1 else nullcontext()
                with sync:
                    out = step_fn(step, sl)
                    if out.loss is not None:
                        primal = True
                        accelerator.backward(out.loss * world)
                        loss_sum += float(out.loss.detach())
                meas_sum += out.measured_sum.detach().double().cpu()
                meas_cnt += out.measured_count.detach().double().cpu()
                for name, v in out.extras.items():
                    extras[name] = extras.get(name, 0.0) + float(v)
            t_dual = time.perf_counter()  # the dual machinery: all-reduce of estimates, projected ascent
            names = sorted(extras)
            packed = torch.cat([meas_sum, meas_cnt, loss_sum.reshape(1),
                                torch.tensor([extras[n] for n in names], dtype=torch.float64)])
            packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum").cpu().double()
            m = meas_sum.numel()
            meas_sum, meas_cnt, loss_val = packed[:m], packed[m:2 * m], float(packed[2 * m])
            extras = {n: float(v) for n, v in zip(names, packed[2 * m + 1:])}
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"non-finite loss {loss_val} at step {step}")
            dual_seconds = time.perf_counter() - t_dual
            if primal:
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
            t_dual = time.perf_counter()
            if torch.any(meas_cnt <= 0):
                raise ValueError(f"step {step}: no constraint estimate for constraint(s) "
                                 f"{torch.nonzero(meas_cnt <= 0).flatten().tolist()}; increase the batch size")
            measured = meas_sum / meas_cnt
            lam_used = dual.lam.clone()
            if dual_active(step):
                violation = dual.step(measured)
            else:
                if not torch.all(torch.isfinite(measured)):
                    raise FloatingPointError(f"non-finite constraint estimate {measured.tolist()} at step {step}")
                violation = dual.violation(measured)
            if world > 1:
                _check_ranks_agree(accelerator, dual.lam, step)
            dual_seconds += time.perf_counter() - t_dual
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            step_seconds = time.perf_counter() - t_start
            last = {"loss": loss_val if primal else None, "lam_used": lam_used, "lam": dual.lam.clone(),
                    "measured": measured, "violation": violation, **extras}
            if accelerator.is_main_process:
                run_dir.log_metrics(step, loss=loss_val if primal else None, check_finite=False,
                                    lam=dual.lam, measured=measured, violation=violation, primal=primal,
                                    step_seconds=step_seconds, dual_seconds=dual_seconds, **extras)
                bar.set_postfix(loss=f"{loss_val:.4g}", lam=f"{float(dual.lam.sum()):.3g}")
            if cfg.log_with:
                accelerator.log({"step_seconds": step_seconds, **({"loss": loss_val} if primal else {}),
                                 **{f"{k}/{i}": float(v[i]) for k, v in (("lam", dual.lam), ("measured", measured))
                                    for i in range(v.numel())}}, step=step)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total_steps or interrupt.pending:
                if accelerator.is_main_process:
                    run_dir.save_checkpoint(tensors=trainable.state_dict(), state={
                        "optimizer": optimizer.state_dict(), "dual": dual.state_dict(), "rng": _rng_state(),
                        "step": step + 1, "last": last})
                accelerator.wait_for_everyone()
            if interrupt.pending:
                announce("interrupted: %s stopped after step %d of %d, checkpointed", desc, step + 1, total_steps)
                raise KeyboardInterrupt
            done += 1
            if pictures and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and step + 1 < total_steps:
                snapshot(step + 1)
            if stop_after is not None and done >= stop_after:
                break
    if pictures and done:
        snapshot(start + done)
    if cfg.log_with:
        accelerator.end_training()
    if world > 1:  # every rank's final multipliers, for auditing the agreement across processes
        from toy.core.runs import atomic_write_json

        atomic_write_json(run_dir.path / "ranks" / f"rank{accelerator.process_index}.json",
                          {"rank": accelerator.process_index, "world_size": world, "lam": dual.lam,
                           "dual_steps": dual.steps})
    return last


class DeferredInterrupt:
    """While active (the main thread of a one-process run): the first SIGINT (Ctrl-C) only sets
    ``pending``, so that the loop finishes the step it is in, checkpoints it and then raises
    ``KeyboardInterrupt``; a second SIGINT interrupts at once (the last checkpoint is kept). With
    several processes a signal may reach only some of them, so there it is not deferred."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.pending = False
        self._old = None

    def _handler(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        log.warning("interrupt: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> "DeferredInterrupt":
        self.enabled = self.enabled and threading.current_thread() is threading.main_thread()
        if self.enabled:
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._old if self._old is not None else signal.default_int_handler)


def _check_ranks_agree(accelerator, lam: torch.Tensor, step: int) -> None:
    """All processes must hold bit-identical multipliers after every dual step."""
    every = accelerator.gather(lam.reshape(1, -1).to(accelerator.device)).cpu()
    if not torch.all(every == every[0]):
        raise RuntimeError(f"multipliers differ across processes at step {step}: {every.tolist()}")
