"""Every notebook (jupytext percent ``.py`` in notebooks/) executes top to bottom in quick mode.

Notebooks read ``DUALUNLEARN_QUICK=1`` to shrink their instances, and write figures to
``DUALUNLEARN_FIGDIR`` (default: the working directory)."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_in_quick_mode(path, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext")
    from nbclient import NotebookClient

    monkeypatch.setenv("DUALUNLEARN_QUICK", "1")
    monkeypatch.setenv("DUALUNLEARN_FIGDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert list(tmp_path.glob("*.png")), f"{path.name} drew no figure"


@pytest.mark.full
def test_notebook_05_runs_its_full_default_sweep(tmp_path, monkeypatch):
    """Notebook 05 in full mode: the default sweep (15 members at the default configuration, one
    ensemble) end to end, its figure drawn, every member's verdict printed (run by CI after the
    default suite, ``pytest -m full``; about 2 minutes)."""
    jupytext = pytest.importorskip("jupytext")
    from nbclient import NotebookClient

    path = next(p for p in NOTEBOOKS if p.stem.startswith("05"))
    monkeypatch.delenv("DUALUNLEARN_QUICK", raising=False)
    monkeypatch.setenv("DUALUNLEARN_FIGDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "05_toy_vs_theory.png").stat().st_size > 0
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "15 members trained as one ensemble" in text, text[:2000]
    assert text.count("PASS") + text.count("FAIL") == 15, text


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1
