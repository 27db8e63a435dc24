"""Many toy networks trained as one: an ensemble of (problem, algorithm, budget, seed) members that
advance in the same optimiser step (docs/toy.md, "Ensembles").

- ``StackedEpsMLP``: M ``EpsMLP`` networks as stacked parameters ``W (M, in, out)``, evaluated with
  batched matmuls (``torch.baddbmm``) on ``(M', B, d)`` inputs, optionally on a subset of members.
  Measured on one thread (default width 128, 512 rows): batched matmuls 1.84 ms per member-step
  against 2.06 ms for ``torch.func.functional_call`` + ``vmap`` and 1.67 ms for one ``EpsMLP`` alone
  (forward, backward, Adam): the step is compute-bound, so stacking saves the per-step Python and
  dispatch overhead of the loop around it, not arithmetic.
- ``pretrain_ensemble``: denoising score matching of one network per seed, stacked.
- ``unlearn_ensemble``: the loop of ``toy.algorithms.unlearn`` for every member at once. Every
  member keeps its own multipliers (``DualState``), ``TrajectoryPool``, data streams and torch
  generator, drawn in the order the single run draws them; the loss is the sum of the members'
  losses, so each member's gradient (and, Adam being elementwise, its update) is its own. The
  networks' evaluations (training rows, pool advances) are batched across members.

A one-member ensemble reproduces ``toy.run.run`` to float rounding (the batched matmul sums in
another order than ``nn.Linear``; tested on the lam trajectory and the final weights).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from theory.config import config_to_dict
from toy.algorithms import LoopConfig, Models, elbo_constraint_terms, lu_constraint_exact, \
    tilt_log_weights
from toy.core.dual import DualState
from toy.models import EpsMLP, MixtureEps
from toy.core.diffusion import noised, reverse_step_kl_weights
from toy.core.objectives import composed_eps_target, eta_from_lam, lam_from_eta
from toy.pretrain import MixtureData, save_model
from toy.problems import Problem, default_instance
from toy.core.runs import CheckpointStore, RunDir
from toy.sampling import TrajectoryPool, ddpm_sample

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

    def forward(self, x: torch.Tensor, t: torch.Tensor, members=None) -> torch.Tensor:
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

def pretrain_ensemble(cfgs: list, out_dir: Path, progress=None) -> list[Path]:
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
    for step in range(pre0.steps):
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


# ---------------------------------------------------------------- members

@dataclass
class Member:
    """One member's configuration and state (everything ``toy.run.run`` keeps for one run)."""

    cfg: object  # resolved ``ToyConfig``
    loop: LoopConfig  # ``cfg.train``
    problem: Problem  # with its surrogate reference
    models: Models
    dual: DualState
    pmeta: dict
    gen: torch.Generator
    pool: TrajectoryPool | None = None
    pool_others: tuple = ()
    hist: dict = field(default_factory=lambda: {"lam": [], "measured": [], "measured_se": [], "step_seconds": [],
                                                "dual_seconds": [], "estimate_seconds": [], "pool_seconds": []})

    @property
    def every(self) -> int:
        if self.cfg.algorithm != "primal_dual":
            return 0
        return 1 if self.cfg.problem == "forward_kl" else self.loop.dual_every

    @property
    def pool_estimates(self) -> bool:
        return self.every > 0 and self.cfg.problem != "forward_kl"


def prepare_member(cfg, frozen: EpsMLP, pmeta: dict) -> Member:
    """Everything ``toy.run.run`` sets up before its loop, for one member (same seeds, same resolved
    config, dual domain, step size and initial multipliers). Raises ``ValueError`` for what the
    ensemble does not train: fresh-trajectory estimates, the LU network estimator, LU's composed target."""
    from toy.core.seeding import seeded_generator, derive_seed
    from toy.run import initial_dual
    from toy.config import resolve_problem, schedule
    from toy.evaluation import surrogate_reference

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
    loop = cfg.train
    m = Member(cfg, loop, problem, models, dual, pmeta, seeded_generator(cfg.seed, "unlearn"))
    if (cfg.problem == "reverse_kl" and loop.pool_frac > 0) or m.pool_estimates:
        m.pool = TrajectoryPool(ab, loop.pool_chains or loop.pool_every * int(ab.shape[0]), loop.dual_batch, models.dim)
        if m.pool_estimates and cfg.problem == "reverse_kl":
            m.pool_others = tuple(models.forget)
    return m


def _rows(m: Member, lam: torch.Tensor, ab: torch.Tensor):
    """One member's training rows ``(x_t, t, target, weight)`` (its loss is ``sum weight *
    denoising_loss(net(x_t, t), target)``) and, for FU, what ``after`` needs for the ELBO estimate.
    Random draws in the order of ``toy.algorithms.unlearn``."""
    cfg, loop, models, gen = m.cfg, m.loop, m.models, m.gen
    if cfg.problem != "forward_kl" and loop.target == "reweighted":
        x0 = models.retain_data(loop.batch)
        lam_w = lam if cfg.algorithm != "esd" else lam_from_eta(torch.tensor([cfg.eta]))
        log_w = tilt_log_weights(cfg.problem, lam_w, x0, models.q_exact, models.forget_exact, cfg.variant)
        x_t, t, z = noised(x0, ab, gen)
        return x_t, t, z, torch.softmax(log_w, 0).to(torch.float32), None
    if cfg.problem == "reverse_kl":
        eta = torch.tensor([cfg.eta]) if cfg.algorithm == "esd" else eta_from_lam(lam)
        x0 = models.retain_data(loop.batch)
        if loop.pool_frac > 0:
            own = m.pool.samples()
            k = int(round(loop.pool_frac * loop.batch))
            x0 = torch.cat([x0[: loop.batch - k], own[torch.randint(0, own.shape[0], (k,), generator=gen)]])
        x_t, t, _ = noised(x0, ab, gen)
        with torch.no_grad():
            eps_f = torch.stack([f(x_t, t) for f in models.forget])
        n = x_t.shape[0]
        # the target needs the frozen network at x_t: evaluated batched with the other members, with
        # the same arithmetic as the trained network (at lam = 0 the target is the network's own
        # output and the gradient exactly 0, as in the single run)
        return x_t, t, (eps_f, eta.float()), torch.full((n,), 1.0 / n), None
    if cfg.problem == "forward_kl":
        x0r = models.retain_data(loop.batch)
        x0f = [d(loop.forget_batch) for d in models.forget_data]
        if len(x0f) != 1:
            raise ValueError(f"the ensemble trains one forget distribution, got {len(x0f)}")
        x_t, t, z = noised(x0r, ab, gen)
        xf_t, tf, zf = noised(x0f[0], ab, gen)
        lam32 = lam.to(torch.float32)
        w = torch.cat([torch.full((x_t.shape[0],), 1.0 / x_t.shape[0]),
                       torch.full((xf_t.shape[0],), 1.0 / xf_t.shape[0]) * -lam32[0]])
        with torch.no_grad():
            l_ref = ((models.forget_exact[0](xf_t, tf) - zf).pow(2).flatten(1).mean(1))
        return torch.cat([x_t, xf_t]), torch.cat([t, tf]), torch.cat([z, zf]), w, (x_t.shape[0], tf, l_ref)
    raise ValueError(f"the ensemble trains LU with the reweighted target only, got {loop.target!r}")


def _check_same_schedule(members: list[Member]) -> None:
    l0 = members[0].loop
    for m in members[1:]:
        l = m.loop
        if (l.steps, l.lr, l.lr_final_frac, l.checkpoint_every) != (l0.steps, l0.lr, l0.lr_final_frac, l0.checkpoint_every):
            raise ValueError("ensemble members must share steps, lr, lr_final_frac and checkpoint_every, got "
                             f"{(l.steps, l.lr, l.lr_final_frac, l.checkpoint_every)} and "
                             f"{(l0.steps, l0.lr, l0.lr_final_frac, l0.checkpoint_every)}")


def unlearn_ensemble(members: list[Member], ckpt_path: Path | None = None, progress=None,
                     stop_after: int | None = None) -> StackedEpsMLP:
    """Train every member's network for ``steps`` steps in one stacked optimiser step (see the
    module docstring); the members' histories go to ``member.hist``. Checkpoints the whole
    ensemble (stacked weights, Adam, every member's dual state, generator, data streams and pool)
    to ``ckpt_path`` every ``checkpoint_every`` steps and resumes from it."""
    _check_same_schedule(members)
    loop0 = members[0].loop
    ab = torch.as_tensor(members[0].models.alphas_cumprod, dtype=torch.float32)
    w_kl = reverse_step_kl_weights(ab)
    net = StackedEpsMLP([m.models.frozen for m in members]).train()
    frozen = StackedEpsMLP([m.models.frozen for m in members]).eval().requires_grad_(False)
    for i, m in enumerate(members):
        m.models.net = net.view(i)
    opt = torch.optim.Adam(net.parameters(), lr=loop0.lr)
    start = 0
    store = None if ckpt_path is None else CheckpointStore(ckpt_path)
    loaded = None if store is None else store.load()
    if loaded is not None:
        ck = loaded[0]
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        for m, s in zip(members, ck["members"]):
            m.dual.load_state_dict(s["dual"])
            m.gen.set_state(s["gen"])
            m.models.retain_data.set_state(s["retain_data"])
            for d, ds in zip(m.models.forget_data, s["forget_data"]):
                d.set_state(ds)
            m.hist = s["hist"]
            if m.pool is not None:
                m.pool.load_state_dict(s["pool"])
        start = ck["step"]
    with torch.no_grad():
        for i, m in enumerate(members):
            if m.pool is not None and not m.pool.filled:
                m.pool.fill(net.member(i), m.gen)  # a standalone copy: the single run's sampler, bit for bit
    # members grouped by the shape of their training rows and of their pools: one batched
    # evaluation per group
    done_here = 0
    for step in range(start, loop0.steps):
        t0 = time.perf_counter()
        frac = loop0.lr_final_frac + (1 - loop0.lr_final_frac) * 0.5 * (1 + np.cos(np.pi * step / loop0.steps))
        for group in opt.param_groups:
            group["lr"] = loop0.lr * frac
        rows = [_rows(m, m.dual.lam, ab) for m in members]
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r[0].shape[0], []).append(i)
        per_row: list = [None] * len(members)
        total = 0.0
        for n_rows, idx in groups.items():
            x = torch.stack([rows[i][0] for i in idx])
            t = torch.stack([rows[i][1] for i in idx])
            sub = None if len(idx) == len(members) else idx
            if any(isinstance(rows[i][2], tuple) for i in idx):
                with torch.no_grad():
                    eps_q = frozen(x, t, sub)
            target = torch.stack([composed_eps_target(eps_q[j], *rows[i][2]) if isinstance(rows[i][2], tuple)
                                  else rows[i][2] for j, i in enumerate(idx)])
            w = torch.stack([rows[i][3] for i in idx])
            out = net(x, t, sub)
            l = (out - target).pow(2).mean(2)  # (M', B): denoising_loss per row
            for j, i in enumerate(idx):
                per_row[i] = l[j]
            total = total + (w * l).sum()
        losses = [float((rows[i][3] * per_row[i].detach()).sum()) for i in range(len(members))]
        if not np.all(np.isfinite(losses)):
            bad = [(m.cfg.problem, m.cfg.algorithm, v) for m, v in zip(members, losses) if not np.isfinite(v)]
            raise FloatingPointError(f"non-finite loss at step {step}: {bad}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        t1 = time.perf_counter()
        # pools: one batched evaluation per pool size
        advancing = [i for i, m in enumerate(members) if m.pool is not None and step % m.loop.pool_every == 0]
        pool_groups: dict[int, list[int]] = {}
        for i in advancing:
            pool_groups.setdefault(members[i].pool.n, []).append(i)
        with torch.no_grad():
            for _, idx in pool_groups.items():
                eps = net(torch.stack([members[i].pool.x for i in idx]), torch.stack([members[i].pool.t for i in idx]),
                          None if len(idx) == len(members) else idx)
                for j, i in enumerate(idx):
                    m = members[i]
                    m.pool.advance(lambda x_, t_, e=eps[j]: e, m.gen, m.pool_others)
        t2 = time.perf_counter()
        # dual steps
        for i, m in enumerate(members):
            measured, measured_se = None, None
            if m.every and step % m.every == 0:
                if m.cfg.problem == "forward_kl":
                    n_r, tf, l_ref = rows[i][4]
                    terms = elbo_constraint_terms(per_row[i][n_r:].detach(), l_ref, tf, w_kl, m.models.dim)
                    measured, measured_se = terms.mean().reshape(1).double(), None
                elif m.cfg.problem == "reverse_kl":
                    measured, measured_se = m.pool.take_path_kl()
                else:
                    measured, measured_se = lu_constraint_exact(m.models.net, m.models.forget_exact, m.models.q_exact,
                                                                m.loop.dual_batch, ab, m.gen, m.cfg.variant, m.pool.samples())
                m.dual.step(measured, measured_se)
                m.hist["lam"].append(m.dual.lam.tolist())
                m.hist["measured"].append(measured.tolist())
                m.hist["measured_se"].append(None if measured_se is None else measured_se.tolist())
        t3 = time.perf_counter()
        share = 1.0 / len(members)
        for m in members:
            m.hist["step_seconds"].append((t1 - t0) * share)
            m.hist["pool_seconds"].append((t2 - t1) * share)
            m.hist["dual_seconds"].append((t3 - t2) * share)
            m.hist["estimate_seconds"].append(0.0)
        if progress is not None:
            progress.update(1)
        done_here += 1
        last = step + 1 == loop0.steps
        if store is not None and ((step + 1) % loop0.checkpoint_every == 0 or last):
            store.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                               "members": [{"dual": m.dual.state_dict(), "gen": m.gen.get_state(),
                                            "retain_data": m.models.retain_data.state(),
                                            "forget_data": [d.state() for d in m.models.forget_data],
                                            "hist": m.hist, "pool": None if m.pool is None else m.pool.state_dict()}
                                           for m in members]})
        if stop_after is not None and done_here >= stop_after:
            break
    return net


def evaluate_members(members: list[Member], net: StackedEpsMLP) -> list[dict]:
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


def run_ensemble(cfgs: list, out_dir: str | Path, progress: bool = False) -> list[dict]:
    """Pretrain (one network per seed, together), train every config as one ensemble, evaluate
    each member into ``out_dir / member-{i}`` (its ``cfg.out`` is replaced). Returns the summaries."""
    from toy.pretrain import load_model
    from toy.run import check_pretrained_meta, progress_bar

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(progress)
    seeds = sorted({c.seed for c in cfgs})
    by_seed = {s: next(c for c in cfgs if c.seed == s) for s in seeds}
    given = {c.seed: c.pretrained for c in cfgs if c.pretrained}
    need = [by_seed[s] for s in seeds if s not in given]
    paths = dict(given)
    if need:
        b = bar(total=need[0].pretrain.steps, desc=f"pretrain x{len(need)}", leave=False)
        for c, p in zip(need, pretrain_ensemble(need, out_dir, b)):
            paths[c.seed] = str(p)
        b.close()
    frozen = {}
    for s, p in paths.items():
        f, meta = load_model(p)
        check_pretrained_meta(meta, default_instance().q, by_seed[s])
        frozen[s] = (f.eval().requires_grad_(False), meta)
    members = []
    for i, c in enumerate(cfgs):
        m = prepare_member(replace(c, out=str(out_dir / f"member-{i:03d}"), pretrained=paths[c.seed]), *frozen[c.seed])
        RunDir(m.cfg.out, config_to_dict(m.cfg), m.cfg.seed)  # the resolved config, as a single run records it
        members.append(m)
    b = bar(total=members[0].loop.steps, desc=f"ensemble of {len(members)}")
    net = unlearn_ensemble(members, out_dir / "ensemble-checkpoint", b)
    b.close()
    return evaluate_members(members, net)
