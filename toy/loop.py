"""The one training loop of every algorithm row (``toy.algorithms``), for one network or for a stacked
ensemble of them (``toy.ensemble``): EDM's ``loss.py`` plus score_sde's ``get_step_fn`` pattern.

Per step, for every member: its row's primal step draws a ``Batch`` at the member's multipliers; the
*trainer* evaluates the network(s) on every batch (one network: ``NetworkTrainer``; stacked networks,
batched across members: ``toy.ensemble.StackedTrainer``) and takes one optimiser step on the sum of
the members' objectives (each member's gradient, and with Adam its update, is its own); pools advance;
members due a dual step estimate their constraints and step their ``DualState``. Checkpoints hold the
trainer's state and every member's (dual, generator, data streams, pool, history), so a resumed run
equals an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from toy.algorithms import Algorithm, Batch, Context, LoopConfig, Models, algorithm, segment_losses
from toy.core.diffusion import reverse_step_kl_weights
from toy.core.dual import DualState
from toy.core.runs import RunDir
from toy.core.hints import EpsModel
from toy.sampling import TrajectoryPool

if TYPE_CHECKING:
    from tqdm import tqdm

_MODE_DEPENDENT = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)


def has_mode_dependent_layers(net: EpsModel) -> bool:
    """Whether ``net``'s output depends on train/eval mode (dropout, batch or instance norm). The
    loop switches to eval mode for its no-grad evaluations (pool advances, estimates) only then:
    the switch walks every submodule twice, ~0.1 ms per advance, a sixth of the LU pool's cost."""
    return isinstance(net, torch.nn.Module) and any(isinstance(m, _MODE_DEPENDENT) for m in net.modules())


HIST_KEYS = ("lam", "measured", "measured_se", "step_seconds", "dual_seconds", "estimate_seconds", "pool_seconds")


def empty_history() -> dict:
    return {k: [] for k in HIST_KEYS}


@dataclass
class Member:
    """One trained member: its row of the table, its context (models, data, generator, pool), its
    multipliers and its history; ``run`` receives its per-step metrics when given."""

    algorithm: Algorithm
    ctx: Context
    dual: DualState
    hist: dict = field(default_factory=empty_history)
    run: RunDir | None = None
    #: the multiplier the run reports, from its history (default: the Polyak average of the last
    #: ``average_frac`` of the dual iterates); the settling steps train at it
    reported_lam: Callable[["Member"], np.ndarray] | None = None

    def settle_lam(self) -> torch.Tensor:
        if self.reported_lam is not None:
            lam = self.reported_lam(self)
        else:
            from toy.algorithms import averaged_lam
            lam = averaged_lam(self.hist, self.dual, self.ctx.loop.average_frac)
        return torch.as_tensor(np.asarray(lam, dtype=np.float64)).reshape(-1)

    def state_dict(self) -> dict:
        m = self.ctx.models
        return {"dual": self.dual.state_dict(), "gen": self.ctx.gen.get_state(), "retain_data": m.retain_data.state(),
                "forget_data": [d.state() for d in m.forget_data], "hist": self.hist,
                "pool": None if self.ctx.pool is None else self.ctx.pool.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        m = self.ctx.models
        self.dual.load_state_dict(s["dual"])
        self.ctx.gen.set_state(s["gen"])
        m.retain_data.set_state(s["retain_data"])
        for d, ds in zip(m.forget_data, s["forget_data"]):
            d.set_state(ds)
        self.hist = s["hist"]
        if self.ctx.pool is not None:
            self.ctx.pool.load_state_dict(s["pool"])


def make_member(problem: str, name: str, models: Models, dual: DualState, loop: LoopConfig, gen: torch.Generator,
                variant: str = "likelihood", lu_estimator: str = "exact", run: RunDir | None = None) -> Member:
    """A member for row ``(problem, name)``: its context and, when the row needs one, its pool."""
    alg = algorithm(problem, name, loop, lu_estimator)
    ab = torch.as_tensor(models.alphas_cumprod, dtype=torch.float32)
    if alg.pool and (loop.pool_every < 1 or (alg.every and loop.dual_every % loop.pool_every)):
        raise ValueError(f"pool_every must divide dual_every = {loop.dual_every} (every dual step needs fresh "
                         f"pool advances), got {loop.pool_every}")
    pool = None
    if alg.pool:
        pool = TrajectoryPool(ab, loop.pool_chains or loop.pool_every * int(ab.shape[0]), loop.dual_batch, models.dim)
    ctx = Context(problem, models, ab, reverse_step_kl_weights(ab), loop, gen, models.net, pool, variant)
    return Member(alg, ctx, dual, run=run)


class Trainer(Protocol):
    """What ``train`` asks of a trainer: ``NetworkTrainer`` (one network) or
    ``toy.ensemble.StackedTrainer`` (stacked networks)."""

    opt: torch.optim.Optimizer

    def model(self, i: int) -> Callable: ...

    def losses(self, batches: list[Batch]) -> list[list[torch.Tensor]]: ...

    def eval_mode(self) -> AbstractContextManager[None]: ...

    def fill(self, i: int, pool: TrajectoryPool, gen: torch.Generator) -> None: ...

    def advance(self, members: list[Member], index: list[int]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, s: dict) -> None: ...


class NetworkTrainer:
    """One network behind the model contract, trained with Adam; ``frozen`` evaluates composed
    targets. Switches to eval mode for no-grad evaluations only when the network has mode-dependent
    layers (dropout, norms)."""

    def __init__(self, net: torch.nn.Module, frozen: Callable, lr: float):
        self.net, self.frozen = net, frozen
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        self._toggle = has_mode_dependent_layers(net)

    def model(self, i: int) -> Callable:
        return self.net

    def losses(self, batches: list[Batch]) -> list[list[torch.Tensor]]:
        return [segment_losses(self.net, self.frozen, b) for b in batches]

    def eval_mode(self) -> AbstractContextManager[None]:
        return _EvalMode(self.net if self._toggle else None)

    def fill(self, i: int, pool: TrajectoryPool, gen: torch.Generator) -> None:
        with self.eval_mode():
            pool.fill(self.net, gen)

    def advance(self, members: list["Member"], index: list[int]) -> None:
        """One reverse step of each given member's pool (``index``: their positions in the run)."""
        with self.eval_mode():
            for m in members:
                m.ctx.pool.advance(self.net, m.ctx.gen, tuple(m.ctx.models.forget) if m.algorithm.pool_others else ())

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.net.load_state_dict(s["net"])
        self.opt.load_state_dict(s["opt"])


class _EvalMode:
    def __init__(self, net):
        self.net = net

    def __enter__(self):
        if self.net is not None:
            self.net.eval()

    def __exit__(self, *exc):
        if self.net is not None:
            self.net.train()


@dataclass
class Checkpoints:
    """Where the loop checkpoints: ``load() -> state | None`` and ``save(state)``; ``where`` names it
    in error messages. ``flat``: a one-member run keeps its member's state at the top level."""

    load: Callable[[], dict | None]
    save: Callable[[dict], None]
    where: str = ""
    flat: bool = True


def train(members: list[Member], trainer: Trainer, loop: LoopConfig, checkpoints: Checkpoints | None = None,
          progress: tqdm | None = None,
          stop_after: int | None = None) -> None:
    """Train every member for ``loop.steps`` steps with its dual steps, then ``loop.settle_steps``
    more at its reported multiplier held fixed and the final lr (see the module docstring); histories
    go to ``member.hist``. Resumes from ``checkpoints`` when one is there. ``stop_after`` ends early
    after that many steps of this call (to test resumption)."""
    M = len(members)
    flat = checkpoints is not None and checkpoints.flat and M == 1
    start = 0
    ckpt = None if checkpoints is None else checkpoints.load()
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        for m, s in zip(members, [ckpt] if flat else ckpt["members"]):
            m.load_state_dict(s)
        start = ckpt["step"]
    total = loop.total_steps
    for m in members:
        if m.run is not None:
            m.run.begin(start, total)  # also drops a killed attempt's rows when there was no checkpoint yet
    for i, m in enumerate(members):
        if m.ctx.pool is not None and not m.ctx.pool.filled:
            trainer.fill(i, m.ctx.pool, m.ctx.gen)
    done_here = 0
    fixed: list | None = None  # the settling phase's multipliers (a function of the history: resumable)
    for step in range(start, total):
        t0 = time.perf_counter()
        settling = step >= loop.steps
        if settling and fixed is None:
            fixed = [m.settle_lam() for m in members]
        frac = loop.lr_final_frac + (1 - loop.lr_final_frac) * 0.5 * (1 + np.cos(np.pi * min(step, loop.steps) / loop.steps))
        for group in trainer.opt.param_groups:
            group["lr"] = loop.lr * frac
        batches = [m.algorithm.primal(m.ctx, fixed[i] if settling else m.dual.lam) for i, m in enumerate(members)]
        losses = trainer.losses(batches)
        objectives = [b.objective(ls) for b, ls in zip(batches, losses)]
        values = [float(o.detach()) for o in objectives]
        if not np.all(np.isfinite(values)):
            bad = [(m.algorithm.problem, m.algorithm.name, v, m.dual.lam.tolist())
                   for m, v in zip(members, values) if not np.isfinite(v)]
            raise FloatingPointError(f"non-finite loss at step {step}: {bad}; the last good checkpoint is kept"
                                     + (f" in {checkpoints.where}" if checkpoints is not None and checkpoints.where else ""))
        loss = objectives[0] if M == 1 else torch.stack(objectives).sum()
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt.step()
        t1 = time.perf_counter()
        advancing = [i for i, m in enumerate(members) if m.ctx.pool is not None and step % loop.pool_every == 0]
        if advancing:
            trainer.advance([members[i] for i in advancing], advancing)
        others = sum(members[i].ctx.pool.others_seconds for i in advancing)  # the path-KL share of the advances
        t2 = time.perf_counter()
        est_s = dual_s = 0.0
        for i, m in enumerate(members):
            measured = None
            if m.algorithm.every and not settling and step % m.algorithm.every == 0:
                te = time.perf_counter()
                m.ctx.net = trainer.model(i)
                with trainer.eval_mode():
                    measured, measured_se = m.algorithm.estimate(m.ctx, batches[i], losses[i])
                est_s += time.perf_counter() - te
                td = time.perf_counter()
                m.dual.step(measured, measured_se)
                dual_s += time.perf_counter() - td
                m.hist["lam"].append(m.dual.lam.tolist())
                m.hist["measured"].append(measured.tolist())
                m.hist["measured_se"].append(None if measured_se is None else measured_se.tolist())
            if m.run is not None:
                row = {"loss": values[i], "lam": (fixed[i] if settling else m.dual.lam).tolist()}
                if settling:
                    row["phase"] = "settle"
                if measured is not None:
                    row["constraint"] = measured.tolist()
                m.run.log_metrics(step, **row)
        share = 1.0 / M
        for m in members if not settling else ():  # the per-step costs of the dual phase only
            m.hist["step_seconds"].append((t1 - t0) * share)
            m.hist["pool_seconds"].append((t2 - t1 - others) * share)
            m.hist["estimate_seconds"].append((others + est_s) * share)
            m.hist["dual_seconds"].append(dual_s * share)
        if progress is not None:
            progress.update(1)
            if M == 1:
                progress.set_postfix(lam=", ".join(f"{v:.4g}" for v in members[0].dual.lam.tolist()), refresh=False)
        done_here += 1
        if checkpoints is not None and ((step + 1) % loop.checkpoint_every == 0 or step + 1 in (loop.steps, total)):
            state = {**trainer.state_dict(), "step": step + 1}
            if flat:
                state.update(members[0].state_dict())
            else:
                state["members"] = [m.state_dict() for m in members]
            checkpoints.save(state)
        if stop_after is not None and done_here >= stop_after:
            break


def unlearn(problem: str, algorithm_name: str, models: Models, dual: DualState, cfg: LoopConfig,
            run: RunDir, gen: torch.Generator, variant: str = "likelihood", lu_estimator: str = "exact",
            progress: tqdm | None = None, stop_after: int | None = None,
            reported_lam: Callable[[Member], np.ndarray] | None = None) -> dict:
    """Train ``models.net`` with row ``(problem, algorithm_name)``; multipliers live in ``dual``
    (fixed for baselines and dual-only, where ``dual.lr_dual`` is 0). Resumes from ``run``'s
    checkpoint when present (same result as an uninterrupted run: all RNG states are checkpointed).
    Returns the history: ``lam`` (dual steps, m), ``measured``, ``step_seconds`` and ``dual_seconds``
    per step. ``stop_after`` ends early after that many steps of this call (to test resumption)."""
    member = make_member(problem, algorithm_name, models, dual, cfg, gen, variant, lu_estimator, run)
    member.reported_lam = reported_lam
    trainer = NetworkTrainer(models.net, models.frozen, cfg.lr)
    train([member], trainer, cfg, Checkpoints(run.load_checkpoint, run.save_checkpoint, str(run.checkpoint_path)),
          progress, stop_after)
    return member.hist
