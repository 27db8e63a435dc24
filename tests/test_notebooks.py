"""Every notebook (jupytext percent ``.py`` in notebooks/) executes top to bottom in quick mode.

Notebooks read ``DUALUNLEARN_QUICK=1`` to shrink their instances, and write figures to
``DUALUNLEARN_FIGDIR`` (default: the working directory)."""

import os
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


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1
