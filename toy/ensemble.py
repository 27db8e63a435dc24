"""Many toy networks trained as one: an ensemble of (problem, algorithm, budget, seed) members that
advance in the same optimiser step (docs/toy.md, "Ensembles").

- ``StackedEpsMLP``: M ``EpsMLP`` networks as stacked parameters ``W (M, in, out)``, evaluated with
  batched matmuls (``torch.baddbmm``) on ``(M', B, d)`` inputs, optionally on a subset of members.
  Measured on one thread (default width 128, 512 rows): batched matmuls 1.84 ms per member-step
  against 2.06 ms for ``torch.func.functional_call`` + ``vmap`` and 1.67 ms for one ``EpsMLP`` alone
  (forward, backward, Adam): the step is compute-bound, so stacking saves the per-step Python and
  dispatch overhead of the loop around it, not arithmetic.
- ``pretrain_ensemble``: denoising score matching of one network per seed, stacked.
- ``unlearn_ensemble``: the one loop ``toy.loop.train`` over every member at once, with a
  ``StackedTrainer``. Every member keeps its own row of the algorithm table, multipliers
  (``DualState``), ``TrajectoryPool``, data streams and torch generator, drawn in the order the single
  run draws them; the loss is the sum of the members' objectives, so each member's gradient (and,
  Adam being elementwise, its update) is its own. The networks' evaluations (training rows, composed
  targets, pool advances) are batched across members.

- ``run_ensemble``: pretraining here, then the members split across worker processes, one per core
  (``toy.workers``; each part is trained by ``train_part``), or all of them in this process.

A one-member ensemble reproduces ``toy.run.run`` to float rounding (the batched matmul sums in
another order than ``nn.Linear``; tested on the lam trajectory and the final weights).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from theory.config import config_to_dict
from toy.algorithms import Batch, Composed, LoopConfig, Models
from toy.core.dual import DualState
from toy.loop import Checkpoints, Member, make_member, train
from toy.threads import ThreadTuner, available_cores
from toy.models import EpsMLP, MixtureEps
from toy.core.diffusion import noised
from toy.pretrain import MixtureData, save_model
from toy.problems import Problem, default_instance
from toy.core.runs import CheckpointStore, RunDir
from toy.sampling import TrajectoryPool, ddpm_sample

if TYPE_CHECKING:
    from tqdm import tqdm

    from toy.config import ToyConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- stacked networks

class StackedEpsMLP(nn.Module):
    """M ``EpsMLP`` of one architecture as stacked parameters: ``weights[k]`` (M, in, out) and
    ``biases[k]`` (M, 1, out) for the k-th linear layer. ``forward(x (M', B, d), t (M', B),
    members)`` evaluates members ``members`` (all when None) in one batched matmul per layer."""

    def __init__(self, nets: list[EpsMLP]):
        super().__init__()
        if not nets:
            raise ValueError("an ensemble needs at least one network, got 0")
        cfg = nets[0].config
        for n in nets:
            if n.config != cfg:
                raise ValueError(f"all networks must share one architecture, got {n.config} and {cfg}")
        self.config = dict(cfg)
        self.M = len(nets)
        lins = [[m for m in n.net if isinstance(m, nn.Linear)] for n in nets]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.stack([ls[k].weight.detach().t() for ls in lins]).contiguous()) for k in range(len(lins[0]))])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.stack([ls[k].bias.detach().unsqueeze(0) for ls in lins]).contiguous()) for k in range(len(lins[0]))])
        self.register_buffer("_emb", nets[0]._emb.clone(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, members: Sequence[int] | None = None) -> torch.Tensor:
        if members is None:
            ws, bs = list(self.weights), list(self.biases)
        else:
            idx = torch.as_tensor(members, dtype=torch.long)
            ws = [w.index_select(0, idx) for w in self.weights]
            bs = [b.index_select(0, idx) for b in self.biases]
        t = t.long()
        if t.numel():
            lo, hi = (int(v) for v in torch.aminmax(t))
            if lo < 0 or hi >= self.config["num_timesteps"]:
                raise ValueError(f"timesteps must lie in [0, {self.config['num_timesteps']}), got [{lo}, {hi}]")
        h = torch.cat([x, self._emb[t].to(x.dtype)], dim=2)
        last = len(ws) - 1
        for k, (w, b) in enumerate(zip(ws, bs)):
            h = torch.baddbmm(b, h, w)
            if k < last:
                h = torch.nn.functional.silu(h)
        return h

    def member(self, i: int) -> EpsMLP:
        """Member ``i`` as a standalone ``EpsMLP`` (a copy: its checkpoint slice)."""
        net = EpsMLP(**self.config)
        lins = [m for m in net.net if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for k, lin in enumerate(lins):
                lin.weight.copy_(self.weights[k][i].t())
                lin.bias.copy_(self.biases[k][i, 0])
        return net

    def view(self, i: int) -> "MemberView":
        return MemberView(self, i)


class MemberView:
    """Member ``i`` of a ``StackedEpsMLP`` behind the toy contract ``model(x_t (B, d), t (B,))``."""

    def __init__(self, stacked: StackedEpsMLP, i: int):
        self.stacked, self.i = stacked, int(i)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.stacked(x_t.unsqueeze(0), t.reshape(1, -1).expand(1, x_t.shape[0]), [self.i])[0]


# ---------------------------------------------------------------- pretraining, one network per seed

def pretrain_ensemble(cfgs: list[ToyConfig], out_dir: Path, progress: tqdm | None = None, tuner: ThreadTuner | None = None) -> list[Path]:
    """Pretrain one ``EpsMLP`` per config (one per seed) on fresh samples of q, stacked: each member's
    initialisation, data stream and noise generator are those of ``toy.run.pretrain_on_mixture``
    with purpose "pretrain", and ``torch.optim.Adam`` on stacked parameters is the members' own
    Adams (elementwise). Saves ``out_dir / pretrained-seed{seed}.pt`` (reused when present)."""
    from toy.distances import energy_distance
    from toy.core.seeding import seeded_generator, derive_seed
    from toy.config import schedule
    from toy.run import schedule_key

    out_dir = Path(out_dir)
    paths = [out_dir / f"pretrained-seed{c.seed}.pt" for c in cfgs]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if not todo:
        return paths
    cfg0 = cfgs[todo[0]]
    m0, pre0 = cfg0.model, cfg0.pretrain
    for i in todo:
        c = cfgs[i]
        if (c.model, c.pretrain) != (m0, pre0):
            raise ValueError("members pretrained together need one architecture and pretraining schedule")
    q = default_instance().q
    nets = []
    for i in todo:
        torch.manual_seed(derive_seed(cfgs[i].seed, "pretrain:init"))
        nets.append(EpsMLP(q.dim, m0.hidden, m0.layers, m0.time_dim, cfg0.diffusion.num_timesteps))
    stacked = StackedEpsMLP(nets)
    ab = schedule(cfg0)
    data = [MixtureData(q, derive_seed(cfgs[i].seed, "pretrain:data")) for i in todo]
    gens = [seeded_generator(cfgs[i].seed, "pretrain:noise") for i in todo]
    opt = torch.optim.Adam(stacked.parameters(), lr=pre0.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(pre0.steps, 1), eta_min=pre0.lr * 0.05)
    t0 = time.perf_counter()
    losses = []
    if tuner is not None:
        tuner.restart("pretrain")
    for step in range(pre0.steps):
        if tuner is not None:
            tuner.tick()
        xs, ts, zs = zip(*[noised(d(pre0.batch), ab, g) for d, g in zip(data, gens)])
        out = stacked(torch.stack(xs), torch.stack(ts))
        per = (out - torch.stack(zs)).pow(2).mean(2).mean(1)  # (M,) each member's denoising loss
        if not torch.all(torch.isfinite(per)):
            raise FloatingPointError(f"non-finite pretraining loss {per.tolist()} at step {step}")
        opt.zero_grad(set_to_none=True)
        per.sum().backward()
        opt.step()
        sched.step()
        losses.append(per.detach())
        if progress is not None:
            progress.update(1)
    seconds = time.perf_counter() - t0
    losses = torch.stack(losses)
    for j, i in enumerate(todo):
        c = cfgs[i]
        net = stacked.member(j)
        n_eval = c.evaluation.n_eval
        x = ddpm_sample(net, n_eval, ab, seeded_generator(c.seed, "pretrain:eval"))
        rng = np.random.default_rng(derive_seed(c.seed, "pretrain:eval-ref"))
        meta = {"purpose": "pretrain", "weights": q.weights.tolist(), "means": q.means.tolist(), "covs": q.covs.tolist(),
                "steps": c.pretrain.steps, "final_loss": float(losses[-100:, j].mean()), "seconds": seconds,
                "n_eval": n_eval, "distance_to_data": energy_distance(x, q.sample(n_eval, rng)),
                "noise_floor": energy_distance(q.sample(n_eval, rng), q.sample(n_eval, rng)),
                "schedule": schedule_key(c), "ensemble": len(todo)}
        save_model(paths[i], net, meta)
    log.info("pretrained %d networks together in %.1f s", len(todo), seconds)
    return paths


# ---------------------------------------------------------------- the trainer of stacked networks

class StackedTrainer:
    """``toy.loop.train``'s trainer for M ``EpsMLP`` trained as one ``StackedEpsMLP``: the members'
    batches are grouped by their segments' row counts and each segment is evaluated for a whole group
    in one batched matmul per layer (composed targets with the stacked pretrained networks, the same
    arithmetic as the trained ones); pools advance batched by pool size; Adam on the stacked
    parameters is every member's own Adam (elementwise)."""

    def __init__(self, frozen: list[EpsMLP], lr: float, tuner: ThreadTuner | None = None):
        self.net = StackedEpsMLP(frozen).train()
        self.frozen = StackedEpsMLP(frozen).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.M = len(frozen)
        self.tuner = tuner

    def model(self, i: int) -> MemberView:
        return self.net.view(i)

    def _sub(self, idx: list[int]):
        return None if len(idx) == self.M else idx

    def losses(self, batches: list[Batch]) -> list[list[torch.Tensor]]:
        if self.tuner is not None:
            self.tuner.tick()  # once per step: the thread count follows the machine's load
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(batches):
            groups.setdefault(tuple(seg[0].shape[0] for seg in b.segments), []).append(i)
        out: list = [None] * len(batches)
        for key, idx in groups.items():
            sub = self._sub(idx)
            per: list[list] = [[] for _ in idx]
            for k in range(len(key)):
                x = torch.stack([batches[i].segments[k][0] for i in idx])
                t = torch.stack([batches[i].segments[k][1] for i in idx])
                targets = [batches[i].segments[k][2] for i in idx]
                # the pretrained network only where a target needs it (the composed rows), batched
                comp = [j for j, tg in enumerate(targets) if isinstance(tg, Composed)]
                eps_q = {}
                if comp:
                    with torch.no_grad():
                        got = self.frozen(x[comp] if len(comp) < len(idx) else x,
                                          t[comp] if len(comp) < len(idx) else t,
                                          self._sub([idx[j] for j in comp]))
                    eps_q = {j: got[k] for k, j in enumerate(comp)}
                target = torch.stack([tg.resolve(eps_q[j]) if isinstance(tg, Composed) else tg
                                      for j, tg in enumerate(targets)])
                l = (self.net(x, t, sub) - target).pow(2).mean(2)  # (M', B): denoising_loss per row
                for j in range(len(idx)):
                    per[j].append(l[j])
            for j, i in enumerate(idx):
                out[i] = per[j]
        return out

    def eval_mode(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    @torch.no_grad()
    def fill(self, i: int, pool: TrajectoryPool, gen: torch.Generator) -> None:
        pool.fill(self.net.member(i), gen)  # a standalone copy: the single run's sampler, bit for bit

    @torch.no_grad()
    def advance(self, members: list[Member], index: list[int]) -> None:
        groups: dict[int, list[int]] = {}
        for j, m in enumerate(members):
            groups.setdefault(m.ctx.pool.n, []).append(j)
        for _, js in groups.items():
            idx = [index[j] for j in js]
            eps = self.net(torch.stack([members[j].ctx.pool.x for j in js]),
                           torch.stack([members[j].ctx.pool.t for j in js]), self._sub(idx))
            for k, j in enumerate(js):
                m = members[j]
                m.ctx.pool.advance(lambda x_, t_, e=eps[k]: e, m.ctx.gen,
                                   tuple(m.ctx.models.forget) if m.algorithm.pool_others else ())

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.net.load_state_dict(s["net"])
        self.opt.load_state_dict(s["opt"])


# ---------------------------------------------------------------- members

@dataclass
class Prepared:
    """One member's configuration, its reference values and its trained state (``member``: the
    loop's ``Member``), everything ``toy.run.run`` keeps for one run."""

    cfg: object  # resolved ``ToyConfig``
    loop: LoopConfig  # ``cfg.train``
    problem: Problem  # with its surrogate reference
    pmeta: dict
    member: Member

    @property
    def models(self) -> Models:
        return self.member.ctx.models

    @property
    def dual(self) -> DualState:
        return self.member.dual

    @property
    def hist(self) -> dict:
        return self.member.hist


def prepare_member(cfg: ToyConfig, frozen: EpsMLP, pmeta: dict) -> Prepared:
    """Everything ``toy.run.run`` sets up before its loop, for one member (same seeds, same resolved
    config, dual domain, step size and initial multipliers). Raises ``ValueError`` for what the
    ensemble does not train: fresh-trajectory estimates, the LU network estimator, LU's composed target."""
    from toy.core.seeding import seeded_generator, derive_seed
    from toy.run import initial_dual
    from toy.config import resolve_problem, schedule
    from toy.evaluation import reported_lam, surrogate_reference

    cfg, problem = resolve_problem(cfg)
    if cfg.problem != "forward_kl" and cfg.train.estimate == "fresh":
        raise ValueError(f"the ensemble trains pool estimates only, got estimate={cfg.train.estimate!r}")
    if cfg.dual.lu_estimator != "exact":
        raise ValueError(f"the ensemble trains the exact LU estimator only, got lu_estimator={cfg.dual.lu_estimator!r}")
    if cfg.problem == "likelihood" and cfg.train.target != "reweighted":
        raise ValueError("the ensemble trains LU's reweighted target only, got target='composed'")
    q, forget = problem.q, list(problem.forget)
    ab = schedule(cfg)
    forget_exact = [MixtureEps.from_mixture(f, ab) for f in forget]
    models = Models(net=None, frozen=frozen, forget=forget_exact,
                    retain_data=MixtureData(q, derive_seed(cfg.seed, "retain")),
                    forget_data=[MixtureData(f, derive_seed(cfg.seed, f"forget{i}")) for i, f in enumerate(forget)],
                    alphas_cumprod=ab, forget_exact=forget_exact, q_exact=MixtureEps.from_mixture(q, ab), dim=q.dim)
    problem = replace(problem, lam_surrogate=surrogate_reference(cfg, problem))
    dual = initial_dual(cfg, problem)
    member = make_member(cfg.problem, cfg.algorithm, models, dual, cfg.train, seeded_generator(cfg.seed, "unlearn"),
                         cfg.variant, cfg.dual.lu_estimator)
    member.reported_lam = lambda m: reported_lam(cfg, problem, m.hist, m.dual)[0]
    return Prepared(cfg, cfg.train, problem, pmeta, member)


def _check_same_schedule(members: list[Prepared]) -> None:
    l0 = members[0].loop
    for m in members[1:]:
        l = m.loop
        keys = lambda c: (c.steps, c.settle_frac, c.lr, c.lr_final_frac, c.checkpoint_every, c.pool_every)  # noqa: E731
        if keys(l) != keys(l0):
            raise ValueError("ensemble members must share steps, settle_frac, lr, lr_final_frac, checkpoint_every "
                             f"and pool_every, got {keys(l)} and {keys(l0)}")


def unlearn_ensemble(members: list[Prepared], ckpt_path: Path | None = None, progress: tqdm | None = None,
                     stop_after: int | None = None, tuner: ThreadTuner | None = None) -> StackedEpsMLP:
    """Train every member's network for ``steps`` steps with ``toy.loop.train`` and a
    ``StackedTrainer`` (see the module docstring); the members' histories go to ``member.hist``.
    Checkpoints the whole ensemble (stacked weights, Adam, every member's dual state, generator,
    data streams and pool) to ``ckpt_path`` every ``checkpoint_every`` steps and resumes from it.
    ``tuner`` chooses the thread count as the steps go (``toy.threads``; results do not depend on it)."""
    _check_same_schedule(members)
    if tuner is not None:
        tuner.restart("unlearn")  # another step cost than pretraining's: probe afresh
    trainer = StackedTrainer([m.models.frozen for m in members], members[0].loop.lr, tuner)
    for i, m in enumerate(members):
        m.models.net = trainer.model(i)
        m.member.ctx.net = trainer.model(i)
    checkpoints = None
    if ckpt_path is not None:
        store = CheckpointStore(ckpt_path)
        checkpoints = Checkpoints(lambda: (lambda got: None if got is None else got[0])(store.load()), store.save,
                                  str(ckpt_path), flat=False)
    train([m.member for m in members], trainer, members[0].loop, checkpoints, progress, stop_after)
    return trainer.net


def evaluate_members(members: list[Prepared], net: StackedEpsMLP) -> list[dict]:
    """``toy.evaluation.evaluate`` for every member on its extracted network (summary, samples.npy in the
    member's ``out``). Returns the summaries."""
    from toy.evaluation import Trained, evaluate

    out = []
    cache: dict = {}  # the pretrained and exact-score reference estimates, once per (problem, seed)
    for i, m in enumerate(members):
        Path(m.cfg.out).mkdir(parents=True, exist_ok=True)
        models = replace(m.models, net=net.member(i))
        out.append(evaluate(m.cfg, m.problem, Trained(models, m.dual, m.hist, m.pmeta), cache))
    return out


def run_ensemble(cfgs: list, out_dir: str | Path, progress: bool = False, threads: int | str = "auto",
                 workers: int | str = "auto") -> list[dict]:
    """Pretrain (one network per seed, together), train every config as one ensemble, evaluate
    each member into ``out_dir / member-{i}`` (its ``cfg.out`` is replaced). Returns the summaries
    (each with ``workers``, and ``threads_chosen``: the tuner's decisions).

    ``workers``: the members are split into that many parts of about equal cost, each trained as its
    own stacked ensemble in a process of its own with one thread (``toy.workers``; ``"auto"``: one per
    available core; results do not depend on the split). With one worker everything runs in this
    process and ``threads`` applies: ``"auto"`` lets a ``ThreadTuner`` choose among 1..the available
    cores by measurement as the run goes; an integer fixes the count. Pretraining runs here, with
    ``threads``, before the split."""
    from toy.models import torch_threads

    if threads == "auto":
        tuner, n0 = ThreadTuner(available_cores()), torch.get_num_threads()
    elif isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        tuner, n0 = None, threads
    else:
        raise ValueError(f"threads must be 'auto' or a positive integer, got {threads!r}")
    with torch_threads(n0):  # restores the caller's counts on exit
        return _run_ensemble(cfgs, Path(out_dir), progress, tuner, workers)


def _run_ensemble(cfgs: list, out_dir: Path, progress: bool, tuner: ThreadTuner | None,
                  workers: int | str) -> list[dict]:
    from toy.run import progress_bar
    from toy.workers import resolve_parts, run_parts

    if not cfgs:
        raise ValueError("an ensemble needs at least one member, got 0")
    check_members(cfgs)  # bad input is refused before anything is trained, in this process
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = resolve_parts(cfgs, out_dir, workers)
    bar = progress_bar(progress)
    seeds = sorted({c.seed for c in cfgs})
    by_seed = {s: next(c for c in cfgs if c.seed == s) for s in seeds}
    given = {c.seed: c.pretrained for c in cfgs if c.pretrained}
    need = [by_seed[s] for s in seeds if s not in given]
    paths = dict(given)
    if need:
        b = bar(total=need[0].pretrain.steps, desc=f"pretrain x{len(need)}", leave=False)
        for c, p in zip(need, pretrain_ensemble(need, out_dir, b, tuner)):
            paths[c.seed] = str(p)
        b.close()
    if len(parts) == 1:
        b = bar(total=cfgs[0].train.total_steps, desc=f"ensemble of {len(cfgs)}")
        summaries = train_part(list(enumerate(cfgs)), out_dir, paths, "ensemble-checkpoint", b, tuner)
    else:
        b = bar(total=cfgs[0].train.total_steps * len(parts),
                desc=f"ensemble of {len(cfgs)} in {len(parts)} processes")
        summaries = run_parts(train_part, cfgs, parts, out_dir, paths, b)
    b.close()
    for s in summaries:
        s["workers"] = len(parts)
    return summaries


def check_members(cfgs: list[ToyConfig]) -> None:
    """Every config valid and every budget achievable and representable (``toy.problems.check_budgets``,
    whose refusal names theory's range), once per (problem, budgets, variant): the checks
    ``prepare_member`` would make after pretraining, made before it."""
    from toy.config import validate
    from toy.problems import check_budgets

    inst = default_instance()
    seen = set()
    for c in cfgs:
        validate(c)
        budgets = tuple(float(b) for b in (c.budgets if c.budgets is not None else inst.budgets[c.problem]))
        if (c.problem, budgets, c.variant) not in seen:
            seen.add((c.problem, budgets, c.variant))
            check_budgets(c.problem, inst.q, inst.forget, budgets, c.variant)


def train_part(items: list[tuple[int, ToyConfig]], out_dir: Path, paths: dict, checkpoint: str,
               progress: tqdm | None, tuner: ThreadTuner | None) -> list[dict]:
    """Members ``(i, cfg)`` (written to ``out_dir / member-{i:03d}``) trained as one ensemble, their
    checkpoint ``out_dir / checkpoint``, the pretrained networks ``paths[seed]``; evaluated. Returns
    their summaries in the order given. Runs in a worker process or in the caller's."""
    from toy.models import torch_threads
    from toy.pretrain import load_model
    from toy.run import check_pretrained_meta

    frozen = {}
    for s in sorted({c.seed for _, c in items}):
        f, meta = load_model(paths[s])
        check_pretrained_meta(meta, default_instance().q, next(c for _, c in items if c.seed == s))
        frozen[s] = (f.eval().requires_grad_(False), meta)
    members = []
    for i, c in items:
        m = prepare_member(replace(c, out=str(out_dir / f"member-{i:03d}"), pretrained=paths[c.seed]), *frozen[c.seed])
        RunDir(m.cfg.out, config_to_dict(m.cfg), m.cfg.seed)  # the resolved config, as a single run records it
        members.append(m)
    net = unlearn_ensemble(members, out_dir / checkpoint, progress, tuner=tuner)
    chosen = [] if tuner is None else [{"phase": ph, "step": st, "threads": n, "median_seconds": med}
                                       for ph, st, n, med in tuner.history]
    # the evaluation: large sample batches, at the count the training settled on
    with torch_threads(tuner.chosen if tuner is not None else torch.get_num_threads()):
        summaries = evaluate_members(members, net)
    for s in summaries:
        s["threads_chosen"] = chosen
    return summaries
