"""Every CLI error is one line on stderr with its exit code (docs/runs.md): 2 bad input, 1 failed
checks / unusable checkpoints / internal errors, 3 divergence, 130 Ctrl-C. Bad configs are generated
(hypothesis): values of the wrong type for every field of every command's config, out-of-range
values, unknown keys and malformed TOML literals; each must give exit 2, one line naming the key,
and no traceback, before anything runs."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shlex
import signal
import string
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualunlearn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
        except KeyboardInterrupt:  # must never escape the CLI (it would stop pytest itself)
            code = "KeyboardInterrupt escaped"
    return code, out.getvalue(), err.getvalue()


def _assert_one_line(err: str, code: int, expected: int, *must: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == expected and len(lines) == 1, (code, err)
    assert lines[0].startswith("dualunlearn: "), lines[0]
    for text in must:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ---------------------------------------------------------------- generated bad configs

def _classes() -> dict:
    from scale.commands import _config_classes
    from toy.config import ToyConfig

    return {**_config_classes(), "toy": ToyConfig}


#: a valid invocation of each command that runs nothing (scale: --dry-run; toy: a bad override must
#: stop it before anything runs)
BASE = {
    "concept": ["scale", "concept", "--dry-run", "--set", 'model="m"', "--set", 'concepts=["a cat"]',
                "--set", "budgets=[1.0]"],
    "data": ["scale", "data", "--dry-run", "--set", 'train_dir="d"', "--set", 'forget=["a.png"]',
             "--set", "budget_factor=1.5"],
    "sample": ["scale", "sample", "--dry-run", "--set", 'prompts=["a cat"]'],
    "evaluate": ["scale", "evaluate", "--dry-run", "--set", 'samples="s.npz"'],
    "rehearse": ["scale", "rehearse", "--dry-run"],
    "toy": ["toy", "--problem", "forward_kl", "--no-progress"],
}

#: values outside each key's range (checked by the configs' own validation)
OUT_OF_RANGE = {
    "concept": [("train.steps", "-1"), ("train.batch_size", "0"), ("train.micro_batch", "0"), ("train.lr", "0.0"),
                ("train.lr", "-1e-3"), ("train.checkpoint_every", "0"), ("train.mixed_precision", '"fp8"'),
                ("train.optimizer", '"lbfgs"'), ("lam_sum_max", "1.0"), ("lam_sum_max", "0.0"),
                ("esd_eta", "-0.5"), ("sample_steps", "0"), ("retain_weight", "-1.0"), ("method", '"xyz"')],
    "data": [("train.steps", "-3"), ("train.lr", "-1.0"), ("siss_weight", "-1.0"), ("siss_mix", "1.0"),
             ("siss_mix", "0.0"), ("forget_draws", "0"), ("method", '"retrain"')],
    "sample": [("num_per_prompt", "0"), ("num_steps", "0"), ("kind", '"gan"')],
    "toy": [("train.steps", "0"), ("train.steps", "-5"), ("train.batch", "0"), ("train.dual_every", "0"),
            ("train.checkpoint_every", "0"), ("problem", '"xyz"'), ("variant", '"nope"'), ("train.estimate", '"later"'),
            ("dual.violation_scale", '"cubic"'), ("train.pool_chains", "-100"), ("train.pool_chains", "0"),
            ("train.target", '"other"'), ("dual.lr", "-1.0"), ("dual.gain", "-0.5"), ("siss_lam", "-1.0")],
}

LETTERS = string.ascii_letters


def _fields(command: str) -> list[tuple[str, typing.Any]]:
    """(dotted key, type) of every settable leaf field of the command's config."""
    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                out.append((prefix + f.name, hint))
                walk(hint, prefix + f.name + ".")
            else:
                out.append((prefix + f.name, hint))

    walk(_classes()[command], "")
    return out


def _wrong_literal(hint) -> st.SearchStrategy[str]:
    """TOML literals of another type than ``hint`` (``T | None``: another type than T; TOML has no None)."""
    arms = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) and len(arms) == 1:
        hint = arms[0]
    quoted = st.text(LETTERS, min_size=1, max_size=6).map(json.dumps)
    ints = st.integers(-5, 5).map(str)
    floats = st.floats(-10, 10, allow_nan=False).filter(lambda x: x != int(x)).map(repr)
    bools = st.sampled_from(["true", "false"])
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return st.one_of(ints, quoted, bools)
    if origin is tuple:
        (arg, *_) = typing.get_args(hint)
        bad_item = st.one_of(quoted, bools) if arg is float else st.one_of(ints, bools)
        return st.one_of(quoted, ints, bools, bad_item.map(lambda v: f"[{v}]"))
    if hint is int:
        return st.one_of(quoted, floats, bools, ints.map(lambda v: f"[{v}]"))
    if hint is float:
        return st.one_of(quoted, bools, floats.map(lambda v: f"[{v}]"))
    if hint is bool:
        return st.one_of(quoted, ints, floats)
    if hint is str:
        return st.one_of(ints, floats, bools, quoted.map(lambda v: f"[{v}]"))
    raise AssertionError(f"no wrong-literal strategy for {hint}")


@st.composite
def bad_config(draw):
    """(argv, the exit code, a text the one-line message must contain)."""
    command = draw(st.sampled_from(sorted(BASE)))
    kind = draw(st.sampled_from(["type", "range", "unknown", "literal"]))
    if kind == "range" and command not in OUT_OF_RANGE:
        kind = "type"
    if kind == "type":
        key, hint = draw(st.sampled_from(_fields(command)))
        override, must = f"{key}={draw(_wrong_literal(hint))}", key.split(".")[0]
    elif kind == "range":
        key, value = draw(st.sampled_from(OUT_OF_RANGE[command]))
        override, must = f"{key}={value}", key.split(".")[-1]
    elif kind == "unknown":
        name = "zz" + draw(st.text(LETTERS + "_", max_size=6))
        nested = command in ("concept", "data", "toy") and draw(st.booleans())
        key = f"train.{name}" if nested else name
        override, must = f"{key}={draw(st.integers(0, 9))}", "unknown config key"
    else:  # not a TOML literal: a bare word, a number with a letter in it, an unclosed list or string
        key, _ = draw(st.sampled_from(_fields(command)))
        word = "x" + draw(st.text(LETTERS + string.digits, max_size=5))
        digits = draw(st.integers(1, 999))
        literal = draw(st.sampled_from([word, f"{digits}O{digits}", f"[{word}", f'"{word}', f"[1, {word}]"]))
        override, must = f"{key}={literal}", "is not a TOML literal"
    return [*BASE[command], "--set", override], must


def test_base_invocations_are_valid(tmp_path):
    """The generated configs differ from these valid ones by exactly one bad override."""
    for command, argv in BASE.items():
        if command == "toy":
            continue  # would run: its validity is the other toy tests' business
        code, _, err = _run_cli(argv)
        assert code == 0, (command, err)


@given(bad_config())
def test_generated_bad_configs_fail_in_one_line_with_exit_2(tmp_path_factory, case):
    argv, must = case
    if argv[0] == "toy":
        argv = [*argv, "--out", str(tmp_path_factory.getbasetemp() / "toy-bad")]
    code, _, err = _run_cli(argv)
    _assert_one_line(err, code, 2, must)
    assert not (tmp_path_factory.getbasetemp() / "toy-bad" / "run.json").exists()


@pytest.mark.parametrize("override, must", [
    ("train.steps=abc", "'abc' is not a TOML literal"),
    ("steps=20O0", "'20O0' is not a TOML literal"),
    ("concepts=[a", "'[a' is not a TOML literal"),
    ("train.steps=1.5", "train.steps must be an integer, got 1.5"),
    ("budgets=0.5", "budgets must be a list of numbers (e.g. [0.5]), got 0.5"),
    ('budgets=["a"]', 'budgets[0] must be a number, got "a"'),
    ("train=3", "train is a table of keys"),
])
def test_reported_bad_overrides_are_one_line(override, must):
    code, _, err = _run_cli([*BASE["concept"], "--set", override])
    _assert_one_line(err, code, 2, must)


# ---------------------------------------------------------------- --out, exit codes, Ctrl-C

@pytest.mark.parametrize("argv", [["toy", "--problem", "forward_kl"], ["verify", "--quick"],
                                  ["scale", "data", "--set", 'train_dir="d"', "--set", 'forget=["a.png"]',
                                   "--set", "budget_factor=1.5"]])
def test_out_pointing_at_a_file_is_one_line(tmp_path, argv):
    f = tmp_path / "afile"
    f.write_text("x")
    code, _, err = _run_cli([*argv, "--out", str(f)])
    _assert_one_line(err, code, 2, "is a file, not a directory")


_SECTIONS_RUN: list[str] = []


def _section_that_must_not_run(out_dir, quick, seed):
    _SECTIONS_RUN.append(str(out_dir))
    raise AssertionError("a section ran before the bad --config was refused")


@pytest.mark.parametrize("extra, must", [
    (["--config", "no-such-run.toml"], "does not exist"),
    (["--config", "{bad}", "--set", "train.steps=abc"], "'abc' is not a TOML literal"),
    (["--config", "{bad}", "--set", "nosuch=1"], "unknown config key"),
    (["--set", "train.steps=5"], "pass the scale run's config with --config"),
])
def test_verify_refuses_a_bad_run_config_before_running_any_section(tmp_path, monkeypatch, extra, must):
    """``verify --config`` runs the scale pre-flight after the theory and toy sections (about a
    minute): a config that cannot be loaded is refused first, exit 2, and no report is written."""
    import dualunlearn.verify as V

    monkeypatch.setattr(V, "SECTIONS", (("theory", __name__, "_section_that_must_not_run"),))
    good = ROOT / "configs" / "sd_reverse_kl.toml"
    argv = [a.replace("{bad}", str(good)) for a in extra]
    _SECTIONS_RUN.clear()
    code, _, err = _run_cli(["verify", "--quick", "--out", str(tmp_path / "v"), *argv])
    _assert_one_line(err, code, 2, must)
    assert _SECTIONS_RUN == [] and not (tmp_path / "v" / "report.md").exists()


def test_exit_codes_divergence_checkpoint_internal_and_interrupt(tmp_path, monkeypatch):
    import scale.data
    import toy.run
    from toy.core.runs import CheckpointError

    data_argv = [*BASE["data"][:2], *BASE["data"][3:], "--out", str(tmp_path / "d")]
    toy_argv = [*BASE["toy"], "--out", str(tmp_path / "t")]
    cases = [(FloatingPointError("non-finite loss nan at step 3"), 3, "diverged: non-finite loss nan at step 3"),
             (CheckpointError("no usable checkpoint in x"), 1, "no usable checkpoint in x"),
             (OSError(28, "No space left on device"), 1, "No space left on device"),
             (TypeError("unexpected\nthing"), 1, "internal error: TypeError: unexpected thing (rerun with --verbose"),
             (KeyboardInterrupt(), 130, "interrupted;")]
    for exc, expected, must in cases:
        def boom(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(scale.data, "run", boom)
        monkeypatch.setattr(toy.run, "run", boom)
        for argv in (data_argv, toy_argv):
            code, _, err = _run_cli(argv)
            line = _assert_one_line(err, code, expected)
            assert must in line or (expected == 3 and "diverged" in line and "step 3" in line), line
    # Ctrl-C names the command that continues: the same one, --overwrite replaced by --resume
    code, _, err = _run_cli([*data_argv, "--overwrite"])
    line = _assert_one_line(err, code, 130)
    assert line.endswith(shlex.join(["dualunlearn", *data_argv, "--resume"])), line
    code, _, err = _run_cli([*data_argv, "--overwrite", "--resume"])
    _assert_one_line(err, code, 2, "--resume and --overwrite exclude each other")


TOY_SET = {"model.hidden": 16, "model.layers": 2, "model.time_dim": 8, "pretrain.steps": 40, "pretrain.batch": 64,
           "train.steps": 20, "train.batch": 32, "train.forget_batch": 16, "train.dual_batch": 16,
           "train.checkpoint_every": 5, "evaluation.n_eval": 100, "evaluation.n_constraint": 200,
           "evaluation.n_reference": 100, "figure": False}


def test_ctrl_c_stops_a_real_run_cleanly_and_the_printed_command_resumes_it(tmp_path):
    """SIGINT to a real ``dualunlearn toy`` process in its 8th step: exit 130, one line naming the
    command that continues, no traceback, the last good checkpoint (step 5) kept; that command
    then finishes the run."""
    out = tmp_path / "run"
    marker = tmp_path / "paused"
    argv = ["toy", "--problem", "forward_kl", "--no-progress", "--out", str(out),
            *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TOY_SET.items()), [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "DUALUNLEARN_TEST_PAUSE": "step@8", "DUALUNLEARN_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "dualunlearn.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), proc.communicate(timeout=10)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    line = _assert_one_line(err, proc.returncode, 130, f"interrupted; {out} keeps its last checkpoint")
    from toy.core.runs import CheckpointStore
    assert CheckpointStore(out / "checkpoint").load()[0]["step"] == 5
    assert not list(out.glob(".*.tmp*"))
    command = shlex.split(line.split("to continue: ", 1)[1])
    assert command[0] == "dualunlearn" and command[-1] == "--resume"
    code, _, err = _run_cli(command[1:])
    assert code == 0, err
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(TOY_SET["train.steps"] + round(0.1 * TOY_SET["train.steps"])))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_ctrl_c_stops_a_sweep_and_its_workers_and_the_printed_command_finishes_it(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while ``toy sweep``'s two worker
    processes are parked at a checkpoint: exit 130 with one line naming the command that continues
    (the same command: a sweep resumes by itself, it has no ``--resume``), no worker left running;
    that command then finishes the sweep."""
    from tests.procs import live_where

    out = tmp_path / "sweep"
    marker = tmp_path / "paused"
    argv = ["toy", "sweep", "--problems", "forward_kl", "--budgets", "2.5", "--no-progress", "--no-check",
            "--workers", "2", "--threads", "1", "--out", str(out),
            *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TOY_SET.items()), [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "DUALUNLEARN_TEST_PAUSE": "checkpoint-manifest@2", "DUALUNLEARN_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "dualunlearn.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def group() -> list[int]:  # live members of the sweep's process group
        return live_where("pgrp", proc.pid)

    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), proc.communicate(timeout=10)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 20
        while group() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group() == [], "a worker outlived the interrupted sweep"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in group():
            os.kill(p, signal.SIGKILL)
    line = _assert_one_line(err, proc.returncode, 130, f"interrupted; {out} keeps its last checkpoint")
    command = shlex.split(line.split("to continue: ", 1)[1])
    assert command[0] == "dualunlearn" and command[1:] == argv
    code, _, err = _run_cli(command[1:])
    assert code == 0, err
    assert json.loads((out / "sweep.json").read_text())["workers"] == 2
