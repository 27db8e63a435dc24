"""Kill anywhere: a real toy run (21 kills) and a real tiny scale run (20 kills), SIGKILLed between
steps, before the first checkpoint, inside every stage of a checkpoint write and inside the writes
of ``run.json``, ``metrics.jsonl``, ``pretrained.pt`` and ``summary.json`` (plus a newest checkpoint
truncated on disk), and resumed after each, end with the same ``summary.json``, ``metrics.jsonl``
(less wall-clock fields) and weights as an uninterrupted run, bit for bit.

Each attempt is the ``dualunlearn`` CLI in a forked child process (the parent has torch imported
already, so an attempt costs the run's own set-up, not the interpreter's). The kill lands where the
``DUALUNLEARN_TEST_PAUSE`` hook parks the child (``toy.core.runs.pause_point``)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from toy.core.runs import CheckpointStore

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

TOY_SET = {"model.hidden": 16, "model.layers": 2, "model.time_dim": 8, "pretrain.steps": 60, "pretrain.batch": 64,
           "train.steps": 40, "train.batch": 32, "train.forget_batch": 16, "train.dual_batch": 16,
           "train.checkpoint_every": 10, "evaluation.n_eval": 100, "evaluation.n_constraint": 200,
           "evaluation.n_reference": 100, "figure": False}

# (pause point @ its n-th occurrence in that attempt); "corrupt" truncates the newest checkpoint instead
TOY_KILLS = [
    "atomic-write@1",         # inside the first write of run.json: nothing recorded yet
    "pretrain-step@1",
    "pretrain-step@5",        # pretraining, before its first checkpoint
    "checkpoint-files@1",     # inside the first pretraining checkpoint: files written, no manifest
    "checkpoint-manifest@1",  # complete but not yet swapped in
    "checkpoint-rotate@2",    # second checkpoint: newest moved to .prev, the new one not in place
    "pretrain-step@25",
    "corrupt",                # newest pretraining checkpoint truncated: the previous one is used
    "atomic-write@1",         # inside the write of pretrained.pt (pretraining checkpoints still there)
    "step@3",                 # unlearning, before its first checkpoint: rows 0-2 must go
    "atomic-write@1",         # inside the truncation of metrics.jsonl on resume
    "checkpoint-files@1",
    "checkpoint-rotate@1",    # the first unlearning checkpoint, nothing to fall back to
    "step@15",
    "checkpoint-manifest@1",
    "checkpoint-rotate@1",
    "step@12",
    "checkpoint-files@1",
    "step@1",
    "corrupt",
    "step@15",
    "checkpoint-rotate@2",    # the final checkpoint
    "atomic-write@2",         # inside the write of summary.json (after metrics.jsonl's truncation)
]

SCALE_KILLS = [
    "atomic-write@1",         # inside the first write of run.json
    "step@2",                 # before the first checkpoint
    "checkpoint-files@1",
    "checkpoint-manifest@1",
    "checkpoint-rotate@1",
    "step@5",
    "checkpoint-files@1",
    "checkpoint-rotate@1",
    "step@1",
    "step@4",
    "checkpoint-manifest@1",
    "corrupt",
    "checkpoint-rotate@1",
    "step@6",
    "atomic-write@1",         # inside the truncation of metrics.jsonl on resume
    "checkpoint-files@1",
    "step@3",
    "checkpoint-rotate@2",    # the final checkpoint
    "checkpoint-manifest@1",
    "atomic-write@2",         # inside the write of summary.json
    "atomic-write@1",
]


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Import in the parent what every attempt needs (torch's optimizers pull in torch._dynamo, seconds
    of imports), so that the forked attempts do not each pay for it."""
    import importlib

    for name in ("dualunlearn.cli", "scale.commands", "toy.run", "toy.cli", "scale.data", "accelerate", "diffusers"):
        importlib.import_module(name)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _attempt(argv: list[str], tmp: Path, pause: str | None) -> int | None:
    """Run ``dualunlearn argv`` in a forked child; with ``pause``, SIGKILL it where it parks.
    Returns the exit code, or ``None`` when it was killed."""
    marker = tmp / "paused"
    marker.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.environ.pop("DUALUNLEARN_TEST_PAUSE", None)
            if pause:
                os.environ["DUALUNLEARN_TEST_PAUSE"] = pause
                os.environ["DUALUNLEARN_TEST_PAUSE_MARKER"] = str(marker)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            from dualunlearn.cli import main

            code = main(argv)
        finally:
            os._exit(code)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if marker.exists():
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"attempt {argv} ({pause}) neither finished nor paused in 300 s")


def _corrupt_newest(run: Path, store: str) -> None:
    """Cut the newest checkpoint's state file in half, as a torn write on a faulty disk would."""
    f = run / store / "state.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _kill_sequence(argv: list[str], out: Path, kills: list[str], stores: tuple[str, ...]) -> list[str]:
    """Run ``kills`` against one directory (kill, resume, kill later, ...), then finish."""
    landed = []
    for k, point in enumerate(kills):
        if point == "corrupt":
            store = next((s for s in stores if (out / s / "state.pt").is_file()), None)
            assert store is not None, f"kill #{k}: no checkpoint to corrupt in {out}"
            _corrupt_newest(out, store)
            landed.append(point)
            continue
        code = _attempt(argv, out.parent, point)
        assert code is None, f"kill #{k} at {point} never landed (the attempt exited with {code})"
        landed.append(point)
    assert _attempt(argv, out.parent, None) == 0
    return landed


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def _summary(path: Path, run: Path) -> dict:
    s = json.loads(path.read_text())
    s = {k: v for k, v in s.items() if "seconds" not in k}
    if "weights" in s:
        s["weights"] = str(Path(s["weights"]).relative_to(run))
    return s


def test_toy_run_killed_at_20_or_more_points_resumes_to_the_uninterrupted_result(tmp_path):
    over = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TOY_SET.items()), [])
    full, cut = tmp_path / "full" / "run", tmp_path / "cut" / "run"
    full.parent.mkdir()
    cut.parent.mkdir()
    base = ["toy", "--problem", "forward_kl", "--no-progress", *over]
    assert _attempt([*base, "--out", str(full)], full.parent, None) == 0
    landed = _kill_sequence([*base, "--out", str(cut)], cut, TOY_KILLS, ("pretrain-checkpoint", "checkpoint"))
    assert len([p for p in landed if p != "corrupt"]) >= 20

    assert _summary(cut / "summary.json", cut) == _summary(full / "summary.json", full)
    assert _rows(cut / "metrics.jsonl") == _rows(full / "metrics.jsonl")
    total = TOY_SET["train.steps"] + round(0.1 * TOY_SET["train.steps"])  # dual steps, then settling (10%)
    assert [r["step"] for r in _rows(cut / "metrics.jsonl")] == list(range(total))
    a, _ = CheckpointStore(full / "checkpoint").load()
    b, _ = CheckpointStore(cut / "checkpoint").load()
    assert a["step"] == b["step"] == total
    for name, w in a["net"].items():
        assert torch.equal(w, b["net"][name]), name
    pa = torch.load(full / "pretrained.pt", weights_only=False)["state_dict"]
    pb = torch.load(cut / "pretrained.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not (cut / "pretrain-checkpoint").exists()  # removed once pretrained.pt is saved
    assert not list(cut.glob(".*.tmp*"))


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from scale import builders

    root = tmp_path_factory.mktemp("kill-ddpm")
    builders.save_ddpm(root / "model", builders.build_uncond_unet(seed=3),
                       builders.build_scheduler(50, beta_start=2e-3, beta_end=0.4))
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(imgs / f"{i:03d}.png")
    return root / "model", imgs


def test_scale_run_killed_at_20_or_more_points_resumes_to_the_uninterrupted_result(tiny_ddpm, tmp_path):
    from safetensors.torch import load_file

    model, imgs = tiny_ddpm
    sets = {"model": str(model), "train_dir": str(imgs), "forget": ["003.png"], "budget_factor": 1.5,
            "lr_dual": 0.5, "forget_draws": 1, "train.steps": 12, "train.batch_size": 4, "train.micro_batch": 4,
            "train.lr": 1e-3, "train.cpu": True, "train.checkpoint_every": 3}
    over = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])
    full, cut = tmp_path / "full" / "run", tmp_path / "cut" / "run"
    full.parent.mkdir()
    cut.parent.mkdir()
    assert _attempt(["scale", "data", *over, "--out", str(full)], full.parent, None) == 0
    landed = _kill_sequence(["scale", "data", *over, "--resume", "--out", str(cut)], cut, SCALE_KILLS,
                            ("checkpoint",))
    assert len([p for p in landed if p != "corrupt"]) >= 20

    assert _summary(cut / "summary.json", cut) == _summary(full / "summary.json", full)
    assert _rows(cut / "metrics.jsonl") == _rows(full / "metrics.jsonl")
    assert [r["step"] for r in _rows(cut / "metrics.jsonl")] == list(range(12))
    wa = load_file(str(full / "checkpoint" / "trainable.safetensors"))
    wb = load_file(str(cut / "checkpoint" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(cut.glob(".*.tmp*"))


def test_ctrl_c_in_a_scale_run_checkpoints_the_step_it_is_in_and_resume_finishes_it(tiny_ddpm, tmp_path,
                                                                                    monkeypatch, caplog):
    """SIGINT during step 2 of 6 (regular checkpoints only at the end): the step finishes, a
    checkpoint of step 3 is written, the CLI exits 130; ``--resume`` continues at step 3 and ends
    where an uninterrupted run ends."""
    import logging

    from safetensors.torch import load_file

    import scale.data
    from dualunlearn.cli import main

    model, imgs = tiny_ddpm
    sets = {"model": str(model), "train_dir": str(imgs), "forget": ["003.png"], "budget_factor": 1.5,
            "forget_draws": 1, "train.steps": 6, "train.batch_size": 4, "train.micro_batch": 4, "train.cpu": True,
            "train.checkpoint_every": 100}
    over = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["scale", "data", *over, "--out", str(full)]) == 0

    real_step = scale.data.DataTask.step

    def step(self, s, sl, dual):
        if s == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 2
        return real_step(self, s, sl, dual)

    monkeypatch.setattr(scale.data.DataTask, "step", step)
    with caplog.at_level(logging.INFO, logger="scale.engine"):
        assert main(["scale", "data", *over, "--out", str(cut)]) == 130
    assert "finishing this step and writing a checkpoint" in caplog.text
    assert CheckpointStore(cut / "checkpoint").load()[0]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    monkeypatch.setattr(scale.data.DataTask, "step", real_step)
    with caplog.at_level(logging.INFO, logger="toy.core.runs"):
        assert main(["scale", "data", *over, "--out", str(cut), "--resume"]) == 0
    assert f"resuming data/forward_kl in {cut} at step 3 of 6" in caplog.text
    assert _rows(cut / "metrics.jsonl") == _rows(full / "metrics.jsonl")
    wa = load_file(str(full / "checkpoint" / "trainable.safetensors"))
    wb = load_file(str(cut / "checkpoint" / "trainable.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
