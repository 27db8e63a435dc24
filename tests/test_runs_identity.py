"""Run directories (docs/runs.md): a changed config is refused and leaves the record alone, an
identical one resumes and says where, excluded keys do not count and input contents do, one process
per directory (live holders refused, stale locks recovered), damaged checkpoints fall back to the
previous one, a killed attempt's metric rows are dropped, pretraining resumes, and files get the
mode the umask gives."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toy.core.runs import (CheckpointError, CheckpointStore, RunDir, RunDirError, atomic_torch_save, check_run_dir,
                      fingerprint, run_identity)

TINY = {"model.hidden": 16, "model.layers": 2, "model.time_dim": 8, "pretrain.steps": 150, "pretrain.batch": 128,
        "train.steps": 20, "train.batch": 64, "train.forget_batch": 32, "train.dual_every": 6, "train.pool_every": 2,
        "train.dual_batch": 16, "train.checkpoint_every": 10, "evaluation.n_eval": 200, "evaluation.n_constraint": 400,
        "evaluation.n_reference": 200, "figure": False}


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    from toy.problems import default_instance
    from toy.config import ToyConfig, override
    from toy.run import pretrain_on_mixture

    path = tmp_path_factory.mktemp("tiny") / "pretrained.pt"
    pretrain_on_mixture(default_instance().q, override(ToyConfig(), TINY), "pretrain", path)
    return path


def _toy_args(out, budget, pretrained):
    over = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TINY.items()), [])
    return ["toy", "--problem", "likelihood", "--budget", str(budget), "--no-progress", "--no-check", "--out", str(out),
            "--set", f'pretrained="{pretrained}"', *over]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("dualunlearn")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_toy_rerun_with_another_budget_is_refused_and_an_identical_one_resumes(tmp_path, tiny_pretrained,
                                                                               capsys, caplog):
    """The reported case: a directory trained at budget 0.004, rerun at 0.01, must refuse (exit 2,
    naming the key and --resume/--overwrite) and keep run.json; rerun at 0.004 it resumes from the
    last checkpoint (step 10 of 22: 20 with dual steps, 2 settling) and says so."""
    from dualunlearn.cli import main
    from toy.config import ToyConfig, override
    from toy.run import run

    out = tmp_path / "lu"
    cfg = override(ToyConfig(problem="likelihood", budgets=(0.004,), out=str(out), pretrained=str(tiny_pretrained)), TINY)
    assert run(cfg, stop_after=15) == {"interrupted_at": 10}
    record = (out / "run.json").read_bytes()

    assert main(_toy_args(out, 0.01, tiny_pretrained)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "budgets: [0.004] there, [0.01] now" in line and "--resume" in line and "--overwrite" in line
    assert (out / "run.json").read_bytes() == record

    with caplog.at_level(logging.INFO, logger="toy.core.runs"):
        assert main(_toy_args(out, 0.004, tiny_pretrained)) == 0
    assert f"resuming run in {out} at step 10 of 22" in caplog.text
    assert (out / "run.json").read_bytes() == record
    summary = (out / "summary.json").read_bytes()

    capsys.readouterr()
    assert main(_toy_args(out, 0.01, tiny_pretrained)) == 2  # a finished run is refused the same way
    assert "budgets: [0.004] there, [0.01] now" in _one_error_line(capsys.readouterr().err)
    assert (out / "run.json").read_bytes() == record and (out / "summary.json").read_bytes() == summary


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from scale import builders

    root = tmp_path_factory.mktemp("ident-ddpm")
    builders.save_ddpm(root / "model", builders.build_uncond_unet(seed=3),
                       builders.build_scheduler(50, beta_start=2e-3, beta_end=0.4))
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(imgs / f"{i:03d}.png")
    return root / "model", imgs


def _data_args(model, imgs, out, *extra):
    sets = {"model": str(model), "train_dir": str(imgs), "forget": ["003.png"], "budget_factor": 1.5,
            "forget_draws": 1, "train.steps": 2, "train.batch_size": 4, "train.micro_batch": 4, "train.cpu": True,
            "train.checkpoint_every": 1}
    return ["scale", "data", "--out", str(out), *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), []),
            *extra]


def test_scale_rerun_needs_resume_and_the_same_config_overwrite_starts_afresh(tiny_ddpm, tmp_path, capsys,
                                                                              caplog):
    from dualunlearn.cli import main

    model, imgs = tiny_ddpm
    out = tmp_path / "fu"
    with caplog.at_level(logging.INFO, logger="toy.core.runs"):
        assert main(_data_args(model, imgs, out, "--resume")) == 0  # --resume into a new directory: starts
    assert f"nothing to resume in {out}: starting data/forward_kl at step 0 of 2" in caplog.text
    caplog.clear()
    record = (out / "run.json").read_bytes()
    capsys.readouterr()

    assert main(_data_args(model, imgs, out)) == 2  # no --resume: an existing run is never overwritten
    line = _one_error_line(capsys.readouterr().err)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert main(_data_args(model, imgs, out, "--resume", "--set", "train.lr=0.5")) == 2
    assert "train.lr: 0.0001 there, 0.5 now" in _one_error_line(capsys.readouterr().err)
    assert (out / "run.json").read_bytes() == record

    with caplog.at_level(logging.INFO, logger="toy.core.runs"):
        assert main(_data_args(model, imgs, out, "--resume")) == 0
    assert f"data/forward_kl in {out}: all 2 steps done already" in caplog.text
    assert (out / "run.json").read_bytes() == record

    assert main(_data_args(model, imgs, out, "--overwrite", "--set", "train.lr=0.5")) == 0
    assert json.loads((out / "run.json").read_text())["config"]["train"]["lr"] == 0.5

    # both checkpoints damaged: one clear error (exit 1), no traceback
    for name in ("checkpoint", "checkpoint.prev"):
        f = out / name / "state.pt"
        f.write_bytes(f.read_bytes()[:100])
    capsys.readouterr()
    assert main(_data_args(model, imgs, out, "--resume", "--set", "train.lr=0.5")) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "no usable checkpoint" in line and "state.pt has 100 bytes" in line


def test_fingerprint_ignores_excluded_keys_and_sees_changed_inputs(tmp_path):
    base = {"out": "a", "seed": 0, "lr": 1e-3, "checkpoint_every": 10, "figure": True,
            "train": {"checkpoint_every": 5, "steps": 3}, "local_files_only": False}
    same = {**base, "out": "b", "checkpoint_every": 99, "figure": False, "local_files_only": True,
            "train": {"checkpoint_every": 1, "steps": 3}}
    assert fingerprint(run_identity(base)) == fingerprint(run_identity(same))
    for key, value in (("lr", 2e-3), ("seed", 1), ("train", {"checkpoint_every": 5, "steps": 4})):
        assert fingerprint(run_identity({**base, key: value})) != fingerprint(run_identity(base)), key

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = tmp_path / "pre.pt"
    weights.write_bytes(b"0" * 1000)
    cfg = {"model": str(model), "pretrained": str(weights), "lr": 0.1}
    RunDir(tmp_path / "run", cfg, 0).close()
    assert check_run_dir(tmp_path / "run", cfg) == "resume"
    weights.write_bytes(b"1" * 1000)  # same size, other content
    with pytest.raises(RunDirError, match=r"the content of pretrained .* changed"):
        check_run_dir(tmp_path / "run", cfg)
    weights.write_bytes(b"0" * 1000)
    (model / "extra.bin").write_bytes(b"x")
    with pytest.raises(RunDirError, match=r"the content of model .* changed"):
        check_run_dir(tmp_path / "run", cfg)
    (model / "extra.bin").unlink()
    assert check_run_dir(tmp_path / "run", cfg) == "resume"
    with pytest.raises(RunDirError, match="pass --resume"):
        check_run_dir(tmp_path / "run", cfg, resume=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        RunDir(tmp_path / "file", cfg, 0)


_HOLDER = """
import sys, time
from toy.core.runs import RunDir
r = RunDir(sys.argv[1], {"a": 1}, 0)
print("held", flush=True)
time.sleep(120)
"""


def test_a_live_holder_is_refused_and_a_dead_ones_lock_is_recovered(tmp_path, caplog, capsys, tiny_pretrained):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"in use by process {holder.pid} "):
            RunDir(out, {"a": 1}, 0)
        from dualunlearn.cli import main  # the CLI says the same in one line, exit 2
        args = _toy_args(out, 0.004, tiny_pretrained)
        assert main(args) == 2
        assert f"in use by process {holder.pid}" in _one_error_line(capsys.readouterr().err)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # the dead holder's lock file is still there
    with caplog.at_level(logging.WARNING, logger="toy.core.runs"):
        with RunDir(out, {"a": 1}, 0) as rd:
            assert (out / ".lock").read_text().strip() == str(os.getpid())
            assert rd.continued
    assert f"recovered the lock of process {holder.pid}" in caplog.text and "no longer running" in caplog.text


def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog):
    store = CheckpointStore(tmp_path / "checkpoint")
    store.save({"step": 1}, {"w": torch.zeros(3)})
    store.save({"step": 2}, {"w": torch.ones(3)})
    state, tensors = store.load()
    assert state["step"] == 2 and torch.equal(tensors["w"], torch.ones(3))
    # same size, one byte changed: only the checksum can tell
    f = tmp_path / "checkpoint" / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="toy.core.runs"):
        state, tensors = store.load()
    assert state["step"] == 1 and torch.equal(tensors["w"], torch.zeros(3))
    assert "trainable.safetensors fails its sha256 checksum" in caplog.text
    # the damaged one is set aside: the next save keeps the good previous one as .prev
    store.save({"step": 2}, {"w": torch.ones(3)})
    assert torch.load(tmp_path / "checkpoint.prev" / "state.pt")["step"] == 1
    # none good: one clear error
    for name in ("checkpoint", "checkpoint.prev"):
        (tmp_path / name / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*checkpoint: manifest.json is corrupt; "
                                              r"checkpoint.prev: manifest.json is corrupt"):
        store.load()


def test_metric_rows_of_a_killed_attempt_are_dropped_even_before_the_first_checkpoint(tmp_path):
    cfg = {"a": 1}
    with RunDir(tmp_path / "r", cfg, 0) as rd:
        for step in range(5):
            rd.log_metrics(step, loss=1.0)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')  # a row cut off by the kill
    with RunDir(tmp_path / "r", cfg, 0) as rd:
        assert rd.continued and [r["step"] for r in rd.read_metrics()] == [0, 1, 2, 3, 4]
        rd.begin(0, 10)  # no checkpoint: the loop starts again at 0
        assert rd.read_metrics() == []
        for step in range(3):
            rd.log_metrics(step, loss=1.0)
        rd.begin(2, 10)  # resumed from a checkpoint at step 2
        assert [r["step"] for r in rd.read_metrics()] == [0, 1]


def test_pretraining_resumes_from_its_checkpoint_and_equals_an_uninterrupted_run(tmp_path, caplog, monkeypatch):
    import numpy as np

    import toy.pretrain as pre
    from theory.diffusion import alphas_cumprod_for_schedule
    from toy.models import EpsMLP
    from toy.problems import default_instance

    q = default_instance().q
    ab = alphas_cumprod_for_schedule(50, 1e-3, 0.2, "linear")

    def train(ckpt, steps=30):
        torch.manual_seed(0)
        net = EpsMLP(2, 16, 2, 8, 50)
        losses = pre.train_denoiser(net, pre.MixtureData(q, 1), ab, steps, 32, 1e-2, torch.Generator().manual_seed(2),
                                    checkpoint=ckpt, checkpoint_every=10)
        return net, losses

    full, l_full = train(None)
    calls = {"n": 0}
    real = pre.pause_point

    def interrupt(point):  # Ctrl-C after the 25th step: the checkpoint of step 20 stays
        real(point)
        if point == "pretrain-step":
            calls["n"] += 1
            if calls["n"] == 25:
                raise KeyboardInterrupt

    monkeypatch.setattr(pre, "pause_point", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "ck")
    monkeypatch.setattr(pre, "pause_point", real)
    with caplog.at_level(logging.INFO, logger="toy.core.runs"):
        resumed, l_res = train(tmp_path / "ck")
    assert f"resuming pretraining at step 20 of 30 ({tmp_path / 'ck'})" in caplog.text
    assert np.array_equal(l_full, l_res)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_run_files_get_the_mode_the_umask_gives(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        with RunDir(tmp_path / "r", {"a": 1}, 0) as rd:
            rd.log_metrics(0, loss=1.0)
            rd.truncate_metrics(0)
            rd.write_summary({"x": 1})
            rd.save_checkpoint({"step": 1}, {"w": torch.zeros(2)})
            rd.save_checkpoint({"step": 2}, {"w": torch.zeros(2)})
            atomic_torch_save({"a": 1}, tmp_path / "r" / "pretrained.pt")
    finally:
        os.umask(old)
    r = tmp_path / "r"
    files = [r / "run.json", r / "metrics.jsonl", r / "summary.json", r / "pretrained.pt",
             *[r / d / f for d in ("checkpoint", "checkpoint.prev")
               for f in ("state.pt", "trainable.safetensors", "manifest.json")]]
    for f in files:
        assert oct(f.stat().st_mode & 0o777) == oct(file_mode), f
    for d in (r / "checkpoint", r / "checkpoint.prev"):
        assert oct(d.stat().st_mode & 0o777) == oct(dir_mode), d


def test_overwrite_empties_a_run_directory_but_keeps_the_config_file_and_lock(tmp_path):
    from toy.core.runs import clear_run_dir

    out = tmp_path / "run"
    with RunDir(out, {"a": 1}, 0) as rd:
        rd.log_metrics(0, loss=1.0)
        rd.save_checkpoint({"step": 1})
    (out / "cfg.toml").write_text("a = 2\n")
    clear_run_dir(out, keep=(out / "cfg.toml",))
    assert sorted(p.name for p in out.iterdir()) == [".lock", "cfg.toml"]
    with RunDir(out, {"a": 2}, 0) as rd:  # a fresh run of another config is welcome now
        assert not rd.continued
    clear_run_dir(tmp_path / "not-a-run")  # nothing there: nothing to do
    assert not (tmp_path / "not-a-run").exists()
