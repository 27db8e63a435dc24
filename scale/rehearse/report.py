"""The rehearsal's ``report.md`` and the pass/fail verdict of each rehearsed method."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scale.names import CONCEPT_METHODS

def _kid_text(mean: float, se: float | None) -> str:
    """``1.2e-03 +- 4.0e-04``: a KID near zero is only meaningful next to its standard error."""
    return f"{mean:.1e}" + ("" if se is None else f" +- {se:.1e}")


def render_report(s: dict) -> str:
    lines = ["# Offline rehearsal on scikit-learn digits", "",
             f"classifier held-out accuracy: {s['classifier_heldout_accuracy']:.3f}", ""]
    if "concept_before" in s:
        b = s["concept_before"]
        lines += ["| model | acc. unlearned digit | acc. retained digits | KID retained +- se | lam | budget | "
                  "constraint (last 10) | verdict |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| pretrained | {b['accuracy_unlearned']:.3f} | {b['accuracy_retained']:.3f} | "
                  f"{_kid_text(b['kid_retained'], b.get('kid_retained_se'))} | | | | |"]
        for mth, r in s["methods"].items():
            if "after" in r and "accuracy_unlearned" in r["after"]:
                a = r["after"]
                lines.append(f"| {mth} | {a['accuracy_unlearned']:.3f} | {a['accuracy_retained']:.3f} | "
                             f"{_kid_text(a['kid_retained'], a.get('kid_retained_se'))} | "
                             f"{np.round(np.asarray(r['lam'], dtype=float), 4).tolist()} | "
                             + ("n/a" if mth == "esd" else f"{np.asarray(r['budgets'], dtype=float).tolist()}") + " | "
                             f"{np.round(r['constraint_last10'], 4).tolist()} | {_verdict_text(r.get('verdict'))} |")
        lines.append("")
    if "ddpm_before" in s:
        b = s["ddpm_before"]
        lines += ["| model | forget loss | retain loss | NN L2 to forget | NN L2 to retain (mean) | KID train +- se | n*lam | verdict |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| pretrained | {np.round(b['forget_loss'], 3).tolist()} | {b['retain_loss']:.3f} | "
                  f"{np.round(b['nn_l2_forget'], 2).tolist()} | {b['nn_l2_retain_mean']:.2f} | {_kid_text(b['kid_train'], b.get('kid_train_se'))} | | |"]
        for mth, r in s["methods"].items():
            if "after" in r and "forget_loss" in r["after"]:
                a = r["after"]
                lines.append(f"| {mth} | {np.round(a['forget_loss'], 3).tolist()} | {a['retain_loss']:.3f} | "
                             f"{np.round(a['nn_l2_forget'], 2).tolist()} | {a['nn_l2_retain_mean']:.2f} | "
                             f"{_kid_text(a['kid_train'], a.get('kid_train_se'))} | "
                             f"{np.round(np.asarray(r['lam_times_n'], dtype=float), 3).tolist()} | {_verdict_text(r.get('verdict'))} |")
        if "memorisation" in s:
            mem = s["memorisation"]
            lines += ["", f"FU budgets ({s['forward_kl_budget_rule']}): memorisation gap = held-out {mem['heldout_loss']:.4f} - "
                      f"retained {mem['retain_loss']:.4f} = {mem['gap']:.4f} (se {mem['gap_se']:.4f}); "
                      f"forget losses ({mem['draws']} fixed draws) {np.round(mem['forget_loss_pre'], 4).tolist()}, "
                      f"budgets {np.round(mem['budgets'], 4).tolist()}", "",
                      "| method | forget loss (fixed draws) | margin to budget +- se | training estimate (last 10) +- se | n*lam |",
                      "|---|---|---|---|---|"]
            for mth, r in s["methods"].items():
                if "budget_margin" in r:
                    lines.append(
                        f"| {mth} | {np.round(r['forget_loss_fixed_draws'], 4).tolist()} | "
                        + ", ".join(f"{m:+.4f} +- {e:.4f}" for m, e in zip(r["budget_margin"], r["budget_margin_se"]))
                        + " | " + ", ".join(f"{m:.4f} +- {e:.4f}" for m, e in zip(r["constraint_last10"], r["constraint_last10_se"]))
                        + f" | {np.round(np.asarray(r['lam_times_n'], dtype=float), 3).tolist()} |")
    if s.get("methods"):
        lines += ["", "Verdicts: " + "; ".join(f"{k}: {v}" for k, v in VERDICT_RULES.items()), "", "## Pictures", ""]
        for mth, r in s["methods"].items():
            figs = sorted(Path(r["run"]).glob("figures/grid_step*.png"))
            for f in figs[-1:] + [Path(r["run"]) / "figures" / "curves.png"]:
                if f.is_file():
                    rel = f.relative_to(Path(s["config"]["out"])) if Path(s["config"]["out"]) in f.parents else f
                    lines += [f"![{mth}: {f.name}]({rel})", ""]
    return "\n".join(lines) + "\n"


#: what each method's verdict checks (``method_verdict``)
VERDICT_RULES = {
    "reverse_kl/reverse_kl_dual_only": "unlearned-digit accuracy <= 0.25 x pretrained, retained accuracy >= pretrained - 0.1, "
                       "constraint (last 10) >= budget - 3 se",
    "likelihood": "unlearned-digit accuracy <= 0.25 x pretrained, retained accuracy >= pretrained - 0.1, "
          "constraint (last 10) <= budget + 3 se",
    "esd": "unlearned-digit accuracy <= 0.25 x pretrained, retained accuracy >= pretrained - 0.1 (no budget)",
    "forward_kl": "every forget image's training estimate (last 10) >= budget - 3 se",
    "siss/siss_is": "every forget image's loss (fixed draws) rose above the pretrained one",
}


def method_verdict(mth: str, r: dict, before: dict, last10: np.ndarray | None = None) -> dict:
    """Pass/fail of one rehearsed method against ``VERDICT_RULES`` (``last10``: the last 10 rows of its
    constraint estimates, (10, m), for the standard errors)."""
    reasons = []
    if mth in CONCEPT_METHODS:
        a = r["after"]
        if a["accuracy_unlearned"] > 0.25 * before["accuracy_unlearned"]:
            reasons.append(f"unlearned accuracy {a['accuracy_unlearned']:.3f} > 0.25 x {before['accuracy_unlearned']:.3f}")
        if a["accuracy_retained"] < before["accuracy_retained"] - 0.1:
            reasons.append(f"retained accuracy {a['accuracy_retained']:.3f} < {before['accuracy_retained']:.3f} - 0.1")
        if mth != "esd" and last10 is not None:
            m = last10.mean(0)
            se = last10.std(0, ddof=1) / np.sqrt(last10.shape[0])
            b = np.asarray(r["budgets"], dtype=float)
            bad = m > b + 3 * se if mth == "likelihood" else m < b - 3 * se
            if np.any(bad):
                reasons.append(f"constraint {np.round(m, 4).tolist()} +- {np.round(se, 4).tolist()} vs budget {b.tolist()}")
    elif mth == "forward_kl":
        m, se, b = (np.asarray(r[k], dtype=float) for k in ("constraint_last10", "constraint_last10_se", "budgets"))
        if np.any(m < b - 3 * se):
            reasons.append(f"forget estimate {np.round(m, 4).tolist()} below budget {np.round(b, 4).tolist()} - 3 se")
    else:
        rise = np.asarray(r["after"]["forget_loss"]) - np.asarray(before["forget_loss"])
        if np.any(rise <= 0):
            reasons.append(f"forget loss change {np.round(rise, 4).tolist()}")
    return {"passed": not reasons, "reasons": reasons}


def _verdict_text(v: dict | None) -> str:
    if v is None:
        return ""
    return "pass" if v["passed"] else "**fail**: " + "; ".join(v["reasons"])
