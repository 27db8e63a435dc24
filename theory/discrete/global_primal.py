"""Certified global primal solvers for the non-convex problems on small finite spaces (``docs/math.md`` §3).

Neither solver uses the dual. Both enumerate the points that *any* global minimiser must be, by the
first-order conditions on the face of the simplex that is its support, and return the best feasible
one. Every 1-D equation solved on the way is monotone on a known bracket, so no root is missed.

**RU** ``min KL(p||q) s.t. KL(p||q_i) >= b_i`` (m <= 2). Let p* have support F. On the relative
interior of F the only constraints are the active ones (set A) and sum p = 1, so either A is empty
and p* = q, or (Fritz John) ``(1 - Mu) log p = log q - sum_{i in A} mu_i log q_i + const`` on F with
multipliers of any sign. For Mu != 1 that is the exponential family
``p_eta ∝ q exp(eta · r)``, r_i = log(q/q_i), eta in R^|A| (LICQ failures lie in it as well);
Mu = 1 forces a combination of the r_i to be constant on F. Along the family
``d/d eta KL(p_eta||q_i) = (1 + eta) Var(r_i)`` (|A| = 1), so the constraint is unimodal with its
minimum at eta = -1 and has at most one root on each side. For |A| = 2 the constraint difference
``KL(p||q_2) - KL(p||q_1) = E_p[log(q_1/q_2)]`` is linear; on the curve of the family where it equals
b_2 - b_1, KL(p||q_1) has derivative ``(1 + alpha) Var(u | s) >= 0`` in the coefficient alpha of
u = r_1 (s = r_2 - r_1): again unimodal. Faces are visited in order of the bound
``KL(p||q) >= -log q(F)`` and pruned with it.

Refinement (``cells = K``): every atom split into K equal cells. Cells of one atom are exchangeable
and the family puts equal mass on the chosen cells of an atom, so a face is fully described by how
many cells of each atom it uses (``(K+1)^n - 1`` faces instead of ``2^(nK) - 1``).

**FU** ``min KL(q||p) s.t. KL(q_i||p) >= b_i`` (m <= 2). A global minimiser has p > 0 on supp q and
no mass off it (no stationary point puts mass there unless q is a combination of the q_i), and
stationarity gives the signed mixtures ``p_mu = (q - mu·Q_A)/(1 - sum mu)`` over the active set A.
|A| = 1: on the two intervals of mu where p_mu > 0, ``mu < min q/q_i`` (KL(q_i||p_mu) increases from
0 to +inf) and ``mu > max q/q_i`` (decreases from +inf to 0): one root each. |A| = 2: one critical
point per region of a strictly convex potential (``_fu_two_active``). Plus p = q when feasible.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import brentq
from scipy.special import rel_entr

from theory.discrete.core import logsumexp

__all__ = ["GlobalResult", "NotCertified", "reverse_kl_global", "forward_kl_global"]


class NotCertified(ValueError):
    """A degenerate instance the enumeration does not cover (it says so instead of guessing)."""

_FEAS_TOL = 1e-9


@dataclass(frozen=True)
class GlobalResult:
    """A certified global optimum: ``value`` = P*, ``p`` a minimiser (on the refined space when
    ``cells > 1``), ``info`` counts faces visited and pruned."""

    value: float
    p: np.ndarray
    info: dict = field(default_factory=dict)


def _kl(p, r):
    return float(np.sum(rel_entr(p, r)))


def _validate_small(problem, q, forget, budgets):
    q = np.asarray(q, np.float64)
    forget = np.atleast_2d(np.asarray(forget, np.float64))
    budgets = np.atleast_1d(np.asarray(budgets, np.float64))
    if q.ndim != 1 or forget.shape[1:] != q.shape or budgets.shape != (forget.shape[0],):
        raise ValueError(f"{problem}: shapes q {q.shape}, forget {forget.shape}, budgets {budgets.shape} do not match")
    return q, forget, budgets


class _Face:
    """The exponential family ``P ∝ w exp(theta · T)`` on one face, in log space."""

    def __init__(self, log_w, stats):
        self.log_w = log_w  # (k,)
        self.T = stats  # (d, k)

    def probs(self, theta):
        logits = self.log_w + theta @ self.T
        A = logsumexp(logits)
        return np.exp(logits - A), logits - A - self.log_w  # P, log(P/w)


def _ru_face_candidates(log_wq, r, b):
    """Candidate (value, P) pairs on one face for RU; r (m, k), b (m,). Yields feasible points only
    (plus they must satisfy every constraint of b)."""
    m, k = r.shape
    out = []

    def feasible(P, log_ratio):
        # KL(P||w_i) = E[log(P/w_q)] + E[r_i]
        base = float(P @ log_ratio)
        kls = base + r @ P
        return np.all(kls >= b - _FEAS_TOL * np.maximum(1.0, np.abs(b))), base

    fam0 = _Face(log_wq, np.zeros((0, k)))
    P0, lr0 = fam0.probs(np.zeros(0))
    ok, val = feasible(P0, lr0)
    if ok:
        out.append((val, P0))
    if k == 1:
        return out
    for i in range(m):  # |A| = 1
        out += [c for c in _ru_one_active(log_wq, r[i], b[i]) if feasible(c[1], c[2])[0]]
    if m == 2:
        out += [c for c in _ru_two_active(log_wq, r, b) if feasible(c[1], c[2])[0]]
    return [(v, P) for v, P, *_ in out]


def _expand(fun, sign, target, max_doublings=60):
    """First -1 + sign 2^(j-3) (j = 0, 1, ...) where the monotone branch fun reaches target, or None
    once fun has stopped moving (it converges to its limit on a lower face exponentially fast)."""
    prev = None
    for j in range(max_doublings):
        x = -1.0 + sign * 2.0 ** (j - 3)
        v = fun(x)
        if v >= target:
            return x
        if prev is not None and abs(v - prev) <= 1e-14 * max(1.0, abs(v)):
            return None
        prev = v
    return None


def _segment_root(fun, a, c, target, iters=200):
    """Bisection for fun(t) = target on [a, c] with fun(a) <= target <= fun(c) (fun continuous)."""
    for _ in range(iters):
        mid = 0.5 * (a + c)
        if fun(mid) < target:
            a = mid
        else:
            c = mid
        if c - a <= 1e-16 * max(1.0, abs(c)):
            break
    return c


def _on_range_value(log_wq, target):
    """A P on the face with KL(P||w_q) == target, for target in [-log w(F), max -log w_x] (else None)."""
    w = np.exp(log_wq - logsumexp(log_wq))
    lo = -logsumexp(log_wq)
    j = int(np.argmin(log_wq))
    hi = -float(log_wq[j])
    if target < lo - 1e-12 or target > hi + 1e-12:
        return None
    vert = np.zeros_like(w)
    vert[j] = 1.0
    wq = np.exp(log_wq)
    f = lambda t: _kl((1 - t) * w + t * vert, wq)  # noqa: E731  convex, f(0) = lo, f(1) = hi
    if target <= lo:
        return w
    t = _segment_root(f, 0.0, 1.0, target)
    return (1 - t) * w + t * vert


def _ru_one_active(log_wq, ri, bi):
    """Points of the face where constraint i is active and stationary: roots of KL(P_eta||w_i) = b_i on
    both monotone branches, or (r_i constant) any P with KL(P||w_q) = b_i - r_i."""
    out = []
    if np.ptp(ri) <= 1e-12 * max(1.0, np.abs(ri).max()):
        P = _on_range_value(log_wq, bi - float(ri[0]))
        if P is not None:
            lr = np.log(np.where(P > 0, P, 1.0)) - log_wq
            lr[P == 0] = 0.0
            out.append((float(P @ lr), P, lr))
        return out
    fam = _Face(log_wq, ri[None, :])

    def h(eta):
        P, lr = fam.probs(np.array([eta]))
        return float(P @ lr) + float(ri @ P), P, lr

    h_min = h(-1.0)[0]
    if h_min >= bi:
        return out  # whole family feasible for this constraint; p ∝ w_q is the face's candidate
    for sign in (1.0, -1.0):
        hi = _expand(lambda eta: h(eta)[0], sign, bi)
        if hi is None:
            continue  # the branch's limit (a lower face) stays below b_i
        a, c = (-1.0, hi) if sign > 0 else (hi, -1.0)
        eta = brentq(lambda e: h(e)[0] - bi, a, c, xtol=1e-15, rtol=1e-15, maxiter=200)
        _, P, lr = h(eta)
        out.append((float(P @ lr), P, lr))
    return out


def _ru_two_active(log_wq, r, b):
    """Stationary points with both constraints active (m = 2), see the module docstring."""
    out = []
    u, s = r[0], r[1] - r[0]
    c = float(b[1] - b[0])
    scale = max(1.0, np.abs(r).max())
    if np.ptp(s) <= 1e-12 * scale:
        return out  # constraints differ by a constant on F: covered by the |A| = 1 candidates
    if not (s.min() < c < s.max()):
        return out
    # u affine in s on F (Mu = 1 or a one-parameter family)?
    X = np.vstack([np.ones_like(s), s]).T
    coef, *_ = np.linalg.lstsq(X, u, rcond=None)
    degenerate = np.ptp(u - X @ coef) <= 1e-10 * scale

    def beta_of(alpha, beta0=0.0):
        """beta with E[s] = c under P ∝ w exp(alpha u + beta s): E[s] increases in beta (its
        derivative is Var(s) > 0), so bracket from beta0 and solve with brentq."""
        def g(beta):
            logits = log_wq + alpha * u + beta * s
            P = np.exp(logits - logsumexp(logits))
            return float(P @ s) - c
        step = 1e-3 * max(1.0, abs(beta0))
        ga = g(beta0)
        if ga == 0.0:
            lo_b = hi_b = beta0
        else:
            direction = 1.0 if ga < 0 else -1.0
            other = beta0
            for _ in range(200):
                other = beta0 + direction * step
                if (g(other) < 0) != (ga < 0) or g(other) == 0.0:
                    break
                step *= 2.0
            lo_b, hi_b = sorted((beta0, other))
        beta = lo_b if lo_b == hi_b else brentq(g, lo_b, hi_b, xtol=1e-14, rtol=1e-15, maxiter=300)
        logits = log_wq + alpha * u + beta * s
        A = logsumexp(logits)
        P = np.exp(logits - A)
        return beta, P, logits - A - log_wq

    if degenerate:
        _, Pc, lrc = beta_of(0.0)
        out.append((float(Pc @ lrc), Pc, lrc))
        a0, kappa = coef
        target = b[0] - a0 - kappa * c  # KL(P||w_q) needed when every P on the slice is stationary
        wq = np.exp(log_wq)
        verts = []
        for x, y in itertools.permutations(range(len(s)), 2):
            if s[x] < c < s[y]:
                th = (s[y] - c) / (s[y] - s[x])
                v = np.zeros_like(s)
                v[x], v[y] = th, 1 - th
                verts.append(v)
        if verts:
            kv = [_kl(v, wq) for v in verts]
            j = int(np.argmax(kv))
            f0 = _kl(Pc, wq)
            if f0 <= target <= kv[j]:
                t = _segment_root(lambda t: _kl((1 - t) * Pc + t * verts[j], wq), 0.0, 1.0, target)
                P = (1 - t) * Pc + t * verts[j]
                lr = np.where(P > 0, np.log(np.where(P > 0, P, 1.0)) - log_wq, 0.0)
                out.append((float(P @ lr), P, lr))
        return out

    cache = {}

    def kl1(alpha):
        a0, b0 = cache.get("last", (None, 0.0))
        guess = b0 * (1.0 + alpha) / (1.0 + a0) if a0 is not None and abs(1.0 + a0) > 1e-3 else b0
        beta, P, lr = beta_of(alpha, guess)
        cache["last"] = (alpha, beta)
        return float(P @ lr) + float(u @ P), P, lr

    if kl1(-1.0)[0] >= b[0]:
        return out
    for sign in (1.0, -1.0):
        cache.pop("last", None)
        hi = _expand(lambda alpha: kl1(alpha)[0], sign, b[0])
        if hi is None:
            continue
        a, cc = (-1.0, hi) if sign > 0 else (hi, -1.0)
        alpha = brentq(lambda x: kl1(x)[0] - b[0], a, cc, xtol=1e-15, rtol=1e-15, maxiter=200)
        _, P, lr = kl1(alpha)
        out.append((float(P @ lr), P, lr))
    return out


def reverse_kl_global(q: ArrayLike, forget: ArrayLike, budgets: ArrayLike, cells: int = 1) -> GlobalResult:
    """Global minimum of RU, ``min KL(p||q) s.t. KL(p||q_i) >= b_i``, m <= 2, by enumerating the
    stationary points of every face (module docstring); with ``cells = K`` of the problem refined by
    ``theory.discrete.refine(q, forget, K)``. Raises ValueError when no point is feasible."""
    q, forget, budgets = _validate_small("reverse_kl", q, forget, budgets)
    m = forget.shape[0]
    if m > 2:
        raise ValueError(f"reverse_kl: the global solver handles m <= 2 constraints, got m = {m}")
    on = q > 0
    if np.any(forget[:, on] <= 0):
        raise ValueError("reverse_kl: the global solver needs supp q inside supp q_i")
    K = int(cells)
    log_q = np.log(q[on])
    r = log_q[None, :] - np.log(forget[:, on])
    n = int(on.sum())
    counts = np.array(list(itertools.product(range(K + 1), repeat=n)))[1:]
    if K > 1 and m > 1:
        raise ValueError(f"reverse_kl: the refined global solver handles m = 1, got m = {m}")
    with np.errstate(divide="ignore"):
        log_frac = np.log(counts / K)
    bounds = -logsumexp(log_q[None, :] + log_frac, axis=1)  # KL(p||q) >= -log q(F) on face F
    order = np.argsort(bounds, kind="stable")
    best, best_P, best_k = np.inf, None, None
    visited = pruned = 0
    for f in order:
        if bounds[f] >= best - 1e-13 * max(1.0, abs(best)):
            pruned += 1
            continue
        visited += 1
        k = counts[f]
        # the face on the refined space: k_x cells of mass q(x)/K for every atom x
        log_w = np.repeat(log_q - np.log(K), k)
        r_cells = np.repeat(r, k, axis=1)
        for val, P in _ru_face_candidates(log_w, r_cells, budgets):
            if val < best:
                best, best_P, best_k = val, P, k
    if best_P is None:
        raise ValueError(f"reverse_kl: budgets = {budgets} are infeasible: no distribution on supp q "
                         f"meets all constraints (global search over {visited} faces)")
    p = np.zeros((q.shape[0], K))
    pos = np.flatnonzero(on)
    start = 0
    for j, x in enumerate(pos):
        p[x, : best_k[j]] = best_P[start:start + best_k[j]]
        start += best_k[j]
    p = p.reshape(-1)
    return GlobalResult(float(best), p, {"faces": len(counts), "visited": visited, "pruned": pruned,
                                         "cells": K})


def forward_kl_global(q: ArrayLike, forget: ArrayLike, budgets: ArrayLike) -> GlobalResult:
    """Global minimum of FU, ``min KL(q||p) s.t. KL(q_i||p) >= b_i``, m <= 2 (module docstring): the
    best feasible point among p = q, the single-active roots (two monotone branches of
    ``p_mu = (q - mu q_i)/(1 - mu)`` per constraint) and, for m = 2, the both-active points
    ``p_mu = (q - mu·Q)/(1 - sum mu)``: in each region where p_mu > 0 (``sum mu < 1`` or ``> 1``)
    they are the critical points of a strictly convex potential (see ``_fu_two_active``), so there
    is at most one per region and damped Newton finds it. Raises ValueError when q lies in the span
    of q_1, q_2 on supp q (the potential degenerates; not certified)."""
    q, forget, budgets = _validate_small("forward_kl", q, forget, budgets)
    m = forget.shape[0]
    if m > 2:
        raise ValueError(f"forward_kl: the global solver handles m <= 2, got m = {m}")
    on = q > 0
    if np.any(forget[:, ~on] > 0):
        raise ValueError("forward_kl: the global solver needs supp q_i inside supp q")
    qs, Qs = q[on], forget[:, on]
    if m == 2 and np.any(np.max(np.abs(Qs - qs[None]), axis=1) <= 1e-15):
        # q_i = q makes that constraint a lower bound on the objective itself: its single-active
        # branch degenerates to p = q and the optimum lies where both are active, which on two atoms
        # the enumeration below does not visit (found by hypothesis: q = q_1 = (1/2, 1/2), q_2 = delta)
        raise NotCertified("forward_kl: a forget distribution equals q on supp q; the global solver "
                           "does not certify this degenerate case")
    cands = []

    def add(ps):
        p = np.zeros_like(q)
        p[on] = ps
        if np.all([_kl(fi, p) >= bi - _FEAS_TOL * max(1.0, abs(bi)) for fi, bi in zip(forget, budgets)]):
            cands.append((_kl(q, p), p))

    add(qs)
    for i in range(m):
        if np.max(np.abs(qs - Qs[i])) <= 1e-15:
            # q_i = q: constraint i is the objective, met by mixing q with a point mass off supp q
            # (mass there is free) or at the atom of smallest q
            bi = float(budgets[i])
            if bi > 0 and (qs.size > 1 or not on.all()):
                e = np.zeros_like(q)
                e[np.flatnonzero(~on)[0] if not on.all() else np.flatnonzero(on)[np.argmin(qs)]] = 1.0
                t = _segment_root(lambda t: _kl(q, (1 - t) * q + t * e), 0.0, 1.0, bi)
                p = (1 - t) * q + t * e
                if np.all([_kl(fj, p) >= bj - _FEAS_TOL * max(1.0, abs(bj)) for fj, bj in zip(forget, budgets)]):
                    cands.append((_kl(q, p), p))
            continue
        for ps in _fu_single_active(qs, Qs[i], float(budgets[i])):
            add(ps)
    if m == 2 and qs.size >= 3:  # on two atoms every point is on a single-active branch
        if np.max(np.abs(Qs[0] - Qs[1])) > 1e-15:
            X = np.vstack([Qs, np.ones_like(qs)])
            if np.linalg.matrix_rank(np.vstack([X, qs])) < 3 or np.linalg.matrix_rank(Qs) < 2 or \
                    np.linalg.lstsq(Qs.T, qs, rcond=None)[1].size and \
                    np.linalg.lstsq(Qs.T, qs, rcond=None)[1][0] <= 1e-24:
                raise NotCertified("forward_kl: q lies in the span of q_1, q_2 on supp q; the global "
                                   "solver does not certify this degenerate case")
            for ps in _fu_two_active(qs, Qs, budgets):
                add(ps)
    if not cands:
        raise ValueError(f"forward_kl: budgets {budgets} are infeasible for every stationary point")
    v, p = min(cands, key=lambda c: c[0])
    return GlobalResult(float(v), p, {"candidates": len(cands)})


def _fu_single_active(qs, q1s, b):
    """Roots of KL(q_1||p_mu) = b on the two monotone branches of p_mu = (q - mu q_1)/(1 - mu)."""
    out = []
    pos = q1s > 0
    mu_lo = float(np.min(qs[pos] / q1s[pos]))

    def branch1(tau):  # mu = mu_lo - e^tau < mu_lo: p = (q - mu q1)/(1 - mu) > 0
        mu = mu_lo - np.exp(tau)
        w = np.maximum(qs - mu_lo * q1s, 0.0) + np.exp(tau) * q1s
        return w / (1.0 - mu)

    _root_on_branch(lambda t: _kl(q1s, branch1(t)), b, decreasing=True, add=lambda t: out.append(branch1(t)))
    if np.all(q1s > 0):
        mu_hi = float(np.max(qs / q1s))

        def branch2(tau):  # mu = mu_hi + e^tau > mu_hi >= 1: p = (mu q1 - q)/(mu - 1) > 0
            mu = mu_hi + np.exp(tau)
            w = np.maximum(mu_hi * q1s - qs, 0.0) + np.exp(tau) * q1s
            return w / (mu - 1.0)

        _root_on_branch(lambda t: _kl(q1s, branch2(t)), b, decreasing=True, add=lambda t: out.append(branch2(t)))
    return out


def _fu_two_active(qs, Qs, b):
    """Points with both FU constraints active: p_mu = s (q - mu·Q)/(1 - M), M = sum mu, s = sign(1 - M),
    positive on supp q. With w = s (q - mu·Q) > 0, z = s (1 - M) > 0 the potential
    ``F(mu) = sum w log w - z log z - s mu·(b - sum_x q_i log q_i)`` has gradient
    ``s (KL(q_i||p_mu) - b_i)`` and Hessian ``sum_x q_i q_j / w - 1/z`` (PSD by Cauchy-Schwarz,
    definite unless q is in the span of the q_i): strictly convex on each region, so one critical
    point at most, found by damped Newton and verified by evaluating the constraints directly."""
    out = []
    negent = np.sum(Qs * np.log(np.where(Qs > 0, Qs, 1.0)), axis=1)
    for s in (1.0, -1.0):
        if s > 0:
            mu = np.zeros(2)
        else:
            tot = Qs.sum(0)
            if np.any(tot <= 0):
                continue  # no mu makes mu·Q > q everywhere
            mu = np.full(2, 2.0 * float(np.max(qs / tot)) + 1.0)

        def parts(mu):
            w = s * (qs - mu @ Qs)
            z = s * (1.0 - mu.sum())
            if np.any(w <= 0) or z <= 0:
                return None
            log_p = np.log(w) - np.log(z)
            kl_i = negent - Qs @ log_p
            # G = sum w log w - z log z has gradient s (KL(q_i||p_mu) - sum q_i log q_i)
            F = float(np.sum(w * np.log(w))) - z * np.log(z) - s * float(mu @ (b - negent))
            g = s * (kl_i - b)
            H = (Qs / w) @ Qs.T - 1.0 / z
            return F, g, H, log_p, kl_i

        cur = parts(mu)
        if cur is None:
            continue
        for _ in range(300):
            F, g, H, log_p, kl_i = cur
            if np.max(np.abs(kl_i - b)) <= 1e-13 * max(1.0, np.abs(b).max()):
                break
            try:
                d = -np.linalg.solve(H, g)
            except np.linalg.LinAlgError:
                break
            t, nxt = 1.0, None
            g_norm = float(np.linalg.norm(g))
            while t > 1e-18:
                cand = parts(mu + t * d)
                # Armijo on F; near the root F's decrease drops below its rounding (F sums terms of
                # both signs), so a step that shrinks the gradient (the constraint residual) is taken too
                if cand is not None and (cand[0] <= F + 1e-4 * t * float(g @ d) + 1e-15 * abs(F)
                                         or float(np.linalg.norm(cand[1])) <= (1.0 - 1e-4 * t) * g_norm):
                    nxt = cand
                    break
                t *= 0.5
            if nxt is None:
                break
            mu, cur = mu + t * d, nxt
        F, g, H, log_p, kl_i = cur
        if np.max(np.abs(kl_i - b)) <= 1e-10 * max(1.0, np.abs(b).max()):
            out.append(np.exp(log_p))
    return out


def _root_on_branch(f, b, decreasing, add):
    """Root of a function of tau that decreases from +inf (tau -> -inf) to 0 (tau -> +inf)."""
    taus = np.linspace(-700.0, 700.0, 281)
    vals = np.array([f(t) for t in taus])
    above = vals >= b
    if not above.any() or above.all():
        return
    j = int(np.flatnonzero(above)[-1])
    if j + 1 >= len(taus):
        return
    t = brentq(lambda t: f(t) - b, taus[j], taus[j + 1], xtol=1e-14, rtol=1e-15, maxiter=300)
    add(t)


