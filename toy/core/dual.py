"""The dual side of every primal-dual algorithm (docs/math.md eqs. 17-18, 33-36), shared by toy and scale.

Vocabulary (cooper): a constraint's *violation* is ``measured - budget`` oriented so that
``violation <= 0`` is feasible. By Danskin the dual gradient at lam is the violation at the
Lagrangian minimiser, so dual ascent is ``lam <- proj(lam + lr_dual * violation)``.

- RU ``KL(p||q_i) >= b_i``   -> violation ``b_i - KL(p||q_i)``
- FU ``KL(q_i||p) >= b_i``   -> violation ``b_i - KL(q_i||p)``
- LU ``E_p[g_i] <= eps_i``   -> violation ``E_p[g_i] - eps_i``

``violation_scale="log"`` (LU with positive g) measures the violation as ``log measured - log budget``:
the same sign and the same zero, so the same fixed points (complementary slackness), but a step
proportional to the *relative* violation. LU's constraint spans orders of magnitude (the pretrained
model's ``E_q[q_1]`` is 10x the default budget) and is flat near lam*, so a step size scaled to the
slope at lam* turns the initial violation into a jump far past lam*; in log scale the first step is
bounded by ``lr * log(measured / budget)`` (docs/toy.md, "LU's estimate and dual step").

The projection is onto the dual domain ``{0 <= lam_i <= upper_i, sum(lam) <= sum_max}``
(RU: ``sum_max < 1`` keeps the tilt defined; FU data unlearning: ``upper_i = 1/n``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from theory import PROBLEMS
from toy.core.hints import Floats

_LOWER_IS_FEASIBLE = {"reverse_kl": False, "forward_kl": False, "likelihood": True}


#: RU's default bound on ``sum(lam)``: the tilt (eq. 7) needs ``sum(lam) < 1``; 0.95 keeps ``eta`` <= 19.
RU_SUM_MAX = 0.95


@dataclass(frozen=True)
class DualDomain:
    """The set the multipliers are projected onto (eq. 35): ``{0 <= lam_i <= upper_i, sum(lam) <= sum_max}``;
    ``None`` leaves that bound out."""

    upper: tuple[float, ...] | None = None
    sum_max: float | None = None


def dual_domain(problem: str, m: int, *, n_train: int | None = None, upper: Floats | None = None,
                ru_sum_max: float = RU_SUM_MAX) -> DualDomain:
    """The dual domain of ``m`` constraints of ``problem``, in one place for every tier:

    - RU: ``sum(lam) <= ru_sum_max < 1``, where the tilt (eq. 7) is defined;
    - FU: ``lam_i <= 1/n`` for data unlearning on ``n_train`` points (eq. 14), or ``lam_i <= upper_i``
      where the signed mixture (eq. 12) stays non-negative, when that end is known per constraint;
    - LU: ``lam >= 0`` only (eq. 16).
    """
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}")
    if int(m) != m or m < 1:
        raise ValueError(f"at least one constraint is required, got m = {m}")
    if problem == "reverse_kl":
        if not 0 < ru_sum_max < 1:
            raise ValueError(f"the RU tilt needs sum(lam) < 1: ru_sum_max must lie in (0, 1), got {ru_sum_max}")
        return DualDomain(sum_max=float(ru_sum_max))
    if problem == "forward_kl":
        if (n_train is None) == (upper is None):
            raise ValueError("the FU dual domain needs exactly one of n_train (data unlearning) or upper")
        if n_train is not None:
            if int(n_train) != n_train or n_train < 1:
                raise ValueError(f"n_train must be a positive integer, got {n_train}")
            return DualDomain(upper=(1.0 / n_train,) * int(m))
        bounds = tuple(float(u) for u in upper)
        if len(bounds) != m or not all(b > 0 for b in bounds):
            raise ValueError(f"upper must hold {m} positive bounds, got {list(bounds)}")
        return DualDomain(upper=bounds)
    return DualDomain()


def constraint_violation(problem: str, measured: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """``measured - budget`` signed so that ``<= 0`` is feasible (see module docstring)."""
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}")
    measured = torch.as_tensor(measured, dtype=torch.float32)
    budgets = torch.as_tensor(budgets, dtype=measured.dtype, device=measured.device)
    if measured.shape != budgets.shape:
        raise ValueError(f"measured has shape {tuple(measured.shape)}, budgets {tuple(budgets.shape)}")
    return measured - budgets if _LOWER_IS_FEASIBLE[problem] else budgets - measured


def project_multipliers(lam: torch.Tensor, upper: torch.Tensor | None = None,
                        sum_max: float | None = None, iters: int = 60) -> torch.Tensor:
    """Euclidean projection onto ``{0 <= lam <= upper, sum(lam) <= sum_max}``.

    Clip to the box; if the sum still exceeds ``sum_max``, find by bisection the shift ``tau``
    with ``sum(clip(lam - tau, 0, upper)) = sum_max`` (the KKT form of the projection).
    """
    hi = torch.full_like(lam, float("inf")) if upper is None else torch.as_tensor(upper).to(lam)
    out = torch.minimum(lam.clamp_min(0.0), hi)
    if sum_max is None or float(out.sum()) <= sum_max:
        return out
    if sum_max < 0:
        raise ValueError(f"sum_max must be >= 0, got {sum_max}")
    tau_lo = torch.zeros((), dtype=lam.dtype, device=lam.device)
    tau_hi = lam.max().clamp_min(0.0)
    for _ in range(iters):
        tau = 0.5 * (tau_lo + tau_hi)
        s = torch.minimum((lam - tau).clamp_min(0.0), hi).sum()
        if s > sum_max:
            tau_lo = tau
        else:
            tau_hi = tau
    return torch.minimum((lam - tau_hi).clamp_min(0.0), hi)


def dual_ascent_step(lam: torch.Tensor, violation: torch.Tensor, lr_dual: float,
                     upper: torch.Tensor | None = None, sum_max: float | None = None) -> torch.Tensor:
    """One projected dual-ascent step ``proj(lam + lr_dual * violation)`` (pure function)."""
    return Project(upper, sum_max)(lam + ScaleBy(lr_dual)(violation.to(lam)))


# ---------------------------------------------------------------- the update as composable pieces
#
# A dual step is ``violation -> scale -> project`` (eq. 35, cooper/optax style): each piece is a small
# immutable callable, ``DualUpdate`` chains them, and ``DualState`` holds only the multipliers, the step
# count and the update (its ``state_dict`` carries the pieces' parameters for checkpoints).

@dataclass(frozen=True)
class Violation:
    """Constraint estimates -> violations (``<= 0`` feasible) of ``problem`` at ``budgets``: linear,
    ``measured - budget`` signed per problem, or ``log`` (LU with positive g), ``log measured - log
    budget`` with the delta-method correction of the log's Jensen bias when a standard error is given
    (``E[log m] = log E[m] - se^2 / (2 E[m]^2) + O(n^-2)``, so the fixed point is ``E[m] = budget``)."""

    problem: str
    budgets: torch.Tensor
    scale: str = "linear"

    def __post_init__(self) -> None:
        if self.problem not in PROBLEMS:
            raise ValueError(f"problem must be one of {PROBLEMS}, got {self.problem!r}")
        if self.scale not in ("linear", "log"):
            raise ValueError(f"violation_scale must be 'linear' or 'log', got {self.scale!r}")
        if self.scale == "log" and (not _LOWER_IS_FEASIBLE[self.problem] or bool((self.budgets <= 0).any())):
            raise ValueError("violation_scale='log' is for upper-bounded constraints with positive budgets "
                             f"(LU with g > 0), got problem {self.problem!r}, budgets {self.budgets.tolist()}")

    def __call__(self, measured, stderr=None) -> torch.Tensor:
        measured = torch.as_tensor(measured, dtype=torch.float64).reshape(-1)
        if self.scale == "log":
            if bool((measured <= 0).any()):
                raise ValueError(f"violation_scale='log' needs positive constraint estimates, got {measured.tolist()}")
            v = measured.log() - self.budgets.log()
            if stderr is not None:
                v = v + 0.5 * (torch.as_tensor(stderr, dtype=torch.float64).reshape(-1) / measured).pow(2)
            return v
        return constraint_violation(self.problem, measured, self.budgets)


@dataclass(frozen=True)
class ScaleBy:
    """The ascent step's size: ``violation -> lr * violation`` (``lr = 0``: fixed multipliers)."""

    lr: float

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"lr_dual must be >= 0, got {self.lr}")

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.lr * v


@dataclass(frozen=True)
class Project:
    """Euclidean projection onto the dual domain ``{0 <= lam <= upper, sum(lam) <= sum_max}`` (eq. 35)."""

    upper: torch.Tensor | None = None
    sum_max: float | None = None

    def __call__(self, lam: torch.Tensor) -> torch.Tensor:
        return project_multipliers(lam, upper=self.upper, sum_max=self.sum_max)


@dataclass(frozen=True)
class DualUpdate:
    """``lam -> project(lam + scale(violation(measured)))``, refusing non-finite estimates and
    multipliers that leave ``[0, max_lam]`` (divergence). Returns the new multipliers and the violation."""

    violation: Violation
    scale: ScaleBy
    project: Project
    max_lam: float = 1e6

    def __call__(self, lam: torch.Tensor, measured, stderr=None, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        measured = torch.as_tensor(measured, dtype=torch.float64).reshape(-1)
        if not torch.all(torch.isfinite(measured)):
            raise FloatingPointError(f"non-finite constraint estimate {measured.tolist()} at dual step {step}")
        v = self.violation(measured, stderr)
        new = self.project(lam + self.scale(v.to(lam)))
        if not torch.all(torch.isfinite(new)) or float(new.max()) > self.max_lam:
            raise FloatingPointError(
                f"multipliers diverged to {new.tolist()} at dual step {step} (max_lam={self.max_lam}); "
                "the budgets may be infeasible or lr_dual too large")
        return new, v


def dual_update(problem: str, budgets: Floats, lr_dual: float, upper: Floats | float | None = None, sum_max: float | None = None,
                max_lam: float = 1e6, violation_scale: str = "linear") -> DualUpdate:
    """The pieces of one problem's dual step from plain parameters (``upper`` broadcast to ``m``)."""
    budgets = torch.as_tensor(budgets, dtype=torch.float64).reshape(-1).clone()
    m = budgets.numel()
    if m < 1:
        raise ValueError("at least one budget is required")
    up = None if upper is None else torch.as_tensor(upper, dtype=torch.float64).reshape(-1).expand(m).clone()
    return DualUpdate(Violation(problem, budgets, violation_scale), ScaleBy(float(lr_dual)), Project(up, sum_max),
                      max_lam)


class DualState:
    """Multipliers of one run: ``lam`` (m,), the dual step count and the ``DualUpdate`` that moves them.

    ``step(measured)`` turns constraint estimates into violations (averaged across processes by
    the caller before this call at scale), takes one projected ascent step, and returns the
    violation. ``state_dict``/``load_state_dict`` make it checkpointable. A non-finite measurement
    or multiplier raises ``FloatingPointError`` rather than poisoning the run. The constructor takes
    the update's parameters (``dual_update``); ``budgets``, ``lr_dual``, ``upper``, ``sum_max``,
    ``max_lam`` and ``violation_scale`` read them back.
    """

    def __init__(self, problem: str, budgets, lr_dual: float, lam_init=None,
                 upper=None, sum_max: float | None = None, max_lam: float = 1e6, violation_scale: str = "linear"):
        if problem not in PROBLEMS:
            raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}")
        self.update = dual_update(problem, budgets, lr_dual, upper, sum_max, max_lam, violation_scale)
        m = self.update.violation.budgets.numel()
        lam = torch.zeros(m, dtype=torch.float64) if lam_init is None else torch.as_tensor(lam_init, dtype=torch.float64).reshape(-1).clone()
        if lam.numel() != m:
            raise ValueError(f"lam_init has {lam.numel()} entries, budgets {m}")
        self.lam = self.update.project(lam)
        self.steps = 0

    problem = property(lambda self: self.update.violation.problem)
    budgets = property(lambda self: self.update.violation.budgets)
    violation_scale = property(lambda self: self.update.violation.scale)
    lr_dual = property(lambda self: self.update.scale.lr)
    upper = property(lambda self: self.update.project.upper)
    sum_max = property(lambda self: self.update.project.sum_max)
    max_lam = property(lambda self: self.update.max_lam)

    def violation(self, measured: Floats, stderr: Floats | None = None) -> torch.Tensor:
        """The violation of ``measured`` (see ``Violation``)."""
        return self.update.violation(measured, stderr)

    def step(self, measured: Floats, stderr: Floats | None = None) -> torch.Tensor:
        """One projected ascent step on the violation of ``measured``; returns the violation."""
        self.lam, v = self.update(self.lam, measured, stderr, self.steps)
        self.steps += 1
        return v

    def state_dict(self) -> dict:
        return {"problem": self.problem, "lam": self.lam.clone(), "budgets": self.budgets.clone(),
                "lr_dual": self.lr_dual, "upper": None if self.upper is None else self.upper.clone(),
                "sum_max": self.sum_max, "steps": self.steps, "violation_scale": self.violation_scale}

    def load_state_dict(self, state: dict) -> None:
        if state["problem"] != self.problem:
            raise ValueError(f"checkpoint is for problem {state['problem']!r}, not {self.problem!r}")
        self.update = DualUpdate(
            Violation(self.problem, state["budgets"].to(torch.float64).clone(), state.get("violation_scale", "linear")),
            ScaleBy(float(state["lr_dual"])),
            Project(None if state["upper"] is None else state["upper"].clone(), state["sum_max"]), self.max_lam)
        self.lam = state["lam"].to(torch.float64).clone()
        self.steps = int(state["steps"])
