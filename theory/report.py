"""Sections of the ``dualunlearn verify`` pre-flight report (plain data, rendered to Markdown and
to a terminal table). Each tier contributes ``Section`` objects; ``dualunlearn.verify`` assembles them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One pre-flight check: what was measured, what it was compared with, and the verdict."""

    name: str
    measured: str
    expected: str
    passed: bool


@dataclass(frozen=True)
class Section:
    """A titled group of checks with the figures (file names relative to the report) it drew."""

    title: str
    checks: tuple[Check, ...]
    figures: tuple[str, ...] = ()
    text: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section], header: str = "") -> str:
    """The whole report as Markdown: a verdict line, then one table and its figures per section."""
    n_pass = sum(c.passed for s in sections for c in s.checks)
    n_all = sum(len(s.checks) for s in sections)
    lines = ["# dualunlearn verify", ""]
    if header:
        lines += [header, ""]
    verdict = "PASS" if n_pass == n_all else "FAIL"
    lines += [f"**{verdict}**: {n_pass}/{n_all} checks passed.", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        lines += ["| check | measured | expected | ok |", "|---|---|---|---|"]
        for c in s.checks:
            ok = "yes" if c.passed else "**NO**"
            lines.append(
                f"| {_md_escape(c.name)} | {_md_escape(c.measured)} | {_md_escape(c.expected)} | {ok} |"
            )
        lines.append("")
        for fig in s.figures:
            lines += [f"![{fig}]({fig})", ""]
        lines += [f"_{s.seconds:.1f} s_", ""]
    return "\n".join(lines)


def render_table(sections: list[Section]) -> str:
    """A fixed-width terminal table of every check."""
    rows = [("section", "check", "measured", "expected", "ok")]
    for s in sections:
        for c in s.checks:
            rows.append((s.title, c.name, c.measured, c.expected, "ok" if c.passed else "FAIL"))
    rows = [tuple(str(x) for x in r) for r in rows]
    cap = (22, 46, 30, 30, 4)
    rows = [tuple(x if len(x) <= w else x[: w - 1] + "~" for x, w in zip(r, cap)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(x.ljust(w) for x, w in zip(r, widths)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
