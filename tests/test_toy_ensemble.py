"""The ensemble (``toy.ensemble``): stacked networks equal their members, an ensemble member equals
its single run (``toy.run.run``) to float rounding whatever else trains beside it, pretraining
together equals pretraining alone, and ``dualunlearn toy sweep`` writes its records and verdicts.

Float rounding, not bit identity: the batched matmul sums in another order than ``nn.Linear``
(measured differences ~6e-8 per evaluation). Over the tiny runs here (40 steps) that moves the
multipliers by 1e-9 to 1e-7 relative; the tolerance 1e-5 leaves room, while a mismatched random
draw (FU's forget noise drawn before the retain noise), another member's multiplier, or another
noise stream in pretraining each fail these tests.
"""

import json

import numpy as np
import pytest
import torch

from toy.core.runs import CheckpointStore
from toy.ensemble import StackedEpsMLP, pretrain_ensemble, run_ensemble
from toy.models import EpsMLP
from toy.problems import default_instance
from toy.config import ToyConfig, override
from toy.run import pretrain_on_mixture, run

TINY = {"model.hidden": 16, "model.layers": 2, "model.time_dim": 8, "pretrain.steps": 150, "pretrain.batch": 128,
        "train.steps": 40, "train.batch": 64, "train.forget_batch": 32, "train.dual_every": 6, "train.pool_every": 2,
        "train.dual_batch": 16, "train.checkpoint_every": 10, "evaluation.n_eval": 200, "evaluation.n_constraint": 400,
        "evaluation.n_reference": 200, "figure": False}


def tiny(**values) -> ToyConfig:
    return override(ToyConfig(), {**TINY, **values})


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ens") / "pretrained.pt"
    pretrain_on_mixture(default_instance().q, tiny(), "pretrain", path)
    return path


def test_stacked_network_equals_its_members_and_slices_back_exactly():
    torch.manual_seed(0)
    nets = [EpsMLP(2, 16, 2, 8, 100) for _ in range(3)]
    st = StackedEpsMLP(nets)
    x, t = torch.randn(3, 50, 2), torch.randint(0, 100, (3, 50))
    out = st(x, t)
    sub = st(x[[2, 0]], t[[2, 0]], [2, 0])
    for i, n in enumerate(nets):
        ref = n(x[i], t[i])
        assert torch.allclose(out[i], ref, atol=1e-6, rtol=1e-6)
        assert torch.allclose(st.view(i)(x[i], t[i]), ref, atol=1e-6, rtol=1e-6)
        back = st.member(i)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), n.state_dict().values()))
    assert torch.equal(sub[0], out[2]) and torch.equal(sub[1], out[0])
    with pytest.raises(ValueError, match="one architecture"):
        StackedEpsMLP([EpsMLP(2, 16, 2, 8, 100), EpsMLP(2, 8, 2, 8, 100)])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 100\), got \[0, 100\]"):
        st(x, torch.full((3, 50), 100).index_fill_(1, torch.tensor([0]), 0))


MEMBERS = [{"problem": "forward_kl"}, {"problem": "likelihood"}, {"problem": "reverse_kl", "train.target": "composed"},
           {"problem": "reverse_kl", "train.target": "reweighted"}, {"problem": "reverse_kl", "algorithm": "esd"},
           {"problem": "forward_kl", "algorithm": "siss", "seed": 0}]


def test_every_member_of_an_ensemble_reproduces_its_single_run(tmp_path, tiny_pretrained):
    """Six members of every kind trained together, each against ``toy.run.run`` of its own config:
    the same dual trajectory and the same end-of-run estimates (relative 1e-5). Covers the random
    draws' order, the per-member multipliers, pools and targets, and that members do not interact."""
    cfgs = [tiny(out=str(tmp_path / f"single-{i}"), pretrained=str(tiny_pretrained),
                 **{"evaluation.surrogate_reference": False}, **kw) for i, kw in enumerate(MEMBERS)]
    singles = [run(c) for c in cfgs]
    hists = [CheckpointStore(tmp_path / f"single-{i}" / "checkpoint").load()[0]["hist"] for i in range(len(cfgs))]
    ens = run_ensemble(cfgs, tmp_path / "ens", workers=1)
    ck = CheckpointStore(tmp_path / "ens" / "ensemble-checkpoint").load()[0]
    for i, (s, e, h) in enumerate(zip(singles, ens, hists)):
        he = ck["members"][i]["hist"]
        assert len(he["lam"]) == len(h["lam"]), MEMBERS[i]
        np.testing.assert_allclose(np.asarray(he["lam"]), np.asarray(h["lam"]), rtol=1e-5, atol=1e-9, err_msg=str(MEMBERS[i]))
        np.testing.assert_allclose(np.asarray(he["measured"]), np.asarray(h["measured"]), rtol=1e-5, err_msg=str(MEMBERS[i]))
        for key in ("lam", "constraint_values", "distance_to_target"):
            np.testing.assert_allclose(np.asarray(e[key]), np.asarray(s[key]), rtol=1e-5, atol=1e-9,
                                       err_msg=f"{MEMBERS[i]} {key}")


def test_pretraining_together_equals_pretraining_alone(tmp_path):
    from toy.pretrain import load_model
    cfgs = [tiny(seed=s) for s in (0, 3)]
    paths = pretrain_ensemble(cfgs, tmp_path)
    for c, p in zip(cfgs, paths):
        alone, _ = pretrain_on_mixture(default_instance().q, c, "pretrain", tmp_path / f"alone-{c.seed}.pt")
        together, meta = load_model(p)
        for a, b in zip(alone.state_dict().values(), together.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        assert meta["ensemble"] == 2


def test_toy_sweep_cli_writes_records_with_verdicts_and_exits_on_failure(tmp_path, tiny_pretrained, capsys):
    from dualunlearn.cli import main
    over = [f"{k}={json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in TINY.items() if k != "figure"]
    sets = sum((["--set", o] for o in over), [])
    args = ["toy", "sweep", "--problems", "forward_kl", "--budgets", "10.5", "--out", str(tmp_path / "sw"), "--no-progress",
            "--set", "dual.lr=0.0"] + sets
    rc = main(args)
    res = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert res["members"] == 2 and (tmp_path / "sw" / "sweep.png").stat().st_size > 0
    kinds = {(r["problem"], r["algorithm"]) for r in res["records"]}
    assert kinds == {("forward_kl", "primal_dual"), ("forward_kl", "siss")}
    for r in res["records"]:
        for key in ("budgets", "seed", "lam", "lam_star", "constraint_values", "constraint_stderr",
                    "distance_to_reference", "distance_noise_floor", "verdict"):
            assert key in r
        assert r["verdict"]["passed"] == all(c["passed"] for c in r["checks"])
        assert r["verdict"]["failed"] == [c["name"] for c in r["checks"] if not c["passed"]]
    out = capsys.readouterr().out
    assert rc == (0 if res["passed"] else 1)
    assert ("PASS:" if res["passed"] else "FAIL:") in out
    # with the dual step off (lr_dual = 0) lam stays 0, where KL(q_1||p) = 5.8 +- 1.1 < 10.5: the constraint check fails
    pd = next(r for r in res["records"] if r["algorithm"] == "primal_dual")
    assert pd["lam"] == [0.0] and "forward_kl primal_dual: constraint holds within estimation error" in pd["verdict"]["failed"]
    assert not res["passed"]
    assert main(args + ["--no-check"]) == 0
    run_json = json.loads((tmp_path / "sw" / "member-000" / "run.json").read_text())
    assert run_json["config"]["threads"] == 1
    assert main(["toy", "sweep", "--problems", "forward_kl", "likelihood", "--budgets", "1", "--out", str(tmp_path / "x")]) == 2


def test_torch_threads_sets_and_restores_the_intra_op_thread_count():
    from toy.models import torch_threads
    before = torch.get_num_threads()
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS pool)
    blas_before = [d["num_threads"] for d in threadpoolctl.threadpool_info()]
    with torch_threads(1):
        assert torch.get_num_threads() == 1
        assert all(d["num_threads"] == 1 for d in threadpoolctl.threadpool_info())
    assert torch.get_num_threads() == before
    assert [d["num_threads"] for d in threadpoolctl.threadpool_info()] == blas_before
    with pytest.raises(ValueError, match="threads must be a positive integer, got 0"):
        torch_threads(0)


def test_toy_cli_prints_a_verdict_per_check_and_exits_1_on_failure(tmp_path, tiny_pretrained, capsys):
    """With the dual step off (lr_dual = 0) FU stays at lam = 0, where KL(q_1||p) = 5.8 +- 1.1 is far
    below the budget 10.5: the constraint check fails, the exit status is 1, and 0 with --no-check."""
    from dualunlearn.cli import main
    over = [f"{k}={json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in TINY.items() if k != "figure"]
    args = ["toy", "--problem", "forward_kl", "--budget", "10.5", "--out", str(tmp_path / "cli"), "--no-progress",
            "--set", f'pretrained="{tiny_pretrained}"', "--set", "dual.lr=0.0"] + sum((["--set", o] for o in over), [])
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL  forward_kl primal_dual: constraint holds within estimation error" in out
    assert "PASS  forward_kl primal_dual: lam in tolerance" in out or "FAIL  forward_kl primal_dual: lam in tolerance" in out
    assert out.strip().splitlines()[-1].startswith("FAIL: ")
    assert main(args + ["--no-check"]) == 0


def test_thread_tuner_keeps_the_faster_count_and_follows_a_change_of_load():
    """Steps that take 10 ms at one thread and 2 ms at two, then the reverse (as when another
    process takes a core): the tuner picks 2, then 1 at its next probe. A count 10x slower than the
    best is dropped after one timed step (settle + 1 step), and probed half as often afterwards;
    max_threads = 1 never probes."""
    import time as _time
    from toy.threads import ThreadTuner
    cost = {1: 0.010, 2: 0.002}
    tuner = ThreadTuner(2, probe=3, every=20)
    tuner.restart("a")
    for step in range(40):
        tuner.tick()
        if step == 20:
            cost = {1: 0.002, 2: 0.010}
        _time.sleep(cost[torch.get_num_threads()])
    assert [h[2] for h in tuner.history] == [2, 1], tuner.history
    assert tuner.history[0][0] == "a" and tuner.history[0][3][1] > tuner.history[0][3][2]
    # 1 thread now; 2 threads 20x slower: each probe spends 2 steps there, and every other probe none
    cost = {1: 0.001, 2: 0.020}
    at2 = 0
    tuner.restart("b")
    for step in range(100):
        tuner.tick()
        at2 += torch.get_num_threads() == 2
        _time.sleep(cost[torch.get_num_threads()])
    tuner.close()
    assert all(h[2] == 1 for h in tuner.history if h[0] == "b")
    assert at2 <= 2 * 3, (at2, tuner.history)  # probes at steps 0, 20, 40, 60, 80: 2 steps in at most 3 of them
    one = ThreadTuner(1)
    for _ in range(5):
        one.tick()
    assert one.history == [] and torch.get_num_threads() == 1
    one.close()
    with pytest.raises(ValueError, match="max_threads"):
        ThreadTuner(0)


def test_stacked_step_is_bitwise_equal_at_one_and_two_threads():
    """What lets the tuner change the count mid-run: torch's CPU matmuls do not split the summed
    dimension across threads here, so forward and backward of the stacked network (and of one
    network) are bitwise equal at 1 and 2 threads."""
    torch.manual_seed(0)
    st = StackedEpsMLP([EpsMLP(2, 128, 3, 32, 100) for _ in range(4)])
    x, t = torch.randn(4, 512, 2), torch.randint(0, 100, (4, 512))
    got = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            st.zero_grad()
            out = st(x, t)
            out.pow(2).mean().backward()
            got.append([out.detach().clone()] + [p.grad.clone() for p in st.parameters()])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*got))


def test_an_interrupted_ensemble_resumes_to_the_uninterrupted_result(tmp_path, tiny_pretrained):
    """Three members (FU, LU, RU composed with its pool) stopped after 15 steps (checkpoint at 10) and
    again inside the settling phase (steps 40-43, checkpoint at 40), then resumed: every member's
    history, multipliers and stacked weights equal the uninterrupted ensemble's exactly."""
    from toy.ensemble import prepare_member, unlearn_ensemble
    from toy.pretrain import load_model

    def members(out):
        frozen, meta = load_model(tiny_pretrained)
        frozen.eval().requires_grad_(False)
        cfgs = [tiny(out=str(out / f"m{i}"), pretrained=str(tiny_pretrained), **{"evaluation.surrogate_reference": False},
                     **kw) for i, kw in enumerate(MEMBERS[:3])]
        return [prepare_member(c, frozen, meta) for c in cfgs]

    full = members(tmp_path / "full")
    net_full = unlearn_ensemble(full, tmp_path / "full" / "ck")
    unlearn_ensemble(members(tmp_path / "cut"), tmp_path / "cut" / "ck", stop_after=15)
    unlearn_ensemble(members(tmp_path / "cut"), tmp_path / "cut" / "ck", stop_after=32)  # 10 -> 42: in settling
    cut = members(tmp_path / "cut")
    net_cut = unlearn_ensemble(cut, tmp_path / "cut" / "ck")
    for a, b in zip(full, cut):
        assert a.hist["lam"] == b.hist["lam"] and a.hist["measured"] == b.hist["measured"]
        assert torch.equal(a.dual.lam, b.dual.lam)
    for (k, wa), wb in zip(net_full.state_dict().items(), net_cut.state_dict().values()):
        assert torch.equal(wa, wb), k


def test_partition_balances_the_cost_and_keeps_every_member_once():
    from toy.sweep import sweep_configs
    from toy.workers import member_cost, partition, reference_cost, step_cost

    costs = [5.0, 3.0, 3.0, 2.0, 2.0, 1.0]
    parts = partition(costs, 2)
    assert sorted(i for p in parts for i in p) == list(range(6)) and all(p == sorted(p) for p in parts)
    assert sorted(sum(costs[i] for i in p) for p in parts) == [8.0, 8.0]
    assert partition([1.0, 1.0, 1.0], 3) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="cannot split 2 members into 3"):
        partition([1.0, 1.0], 3)
    # shared work counts once per part: two members sharing a large reference stay together
    # (apart, each part pays the reference: costs 17 and 17; together 12 and 12)
    shared = [(("a",), 10.0), (("a",), 10.0), (("b",), 0.0), (("b",), 0.0)]
    assert sorted(partition([1.0, 1.0, 6.0, 6.0], 2, shared)) == [[0, 1], [2, 3]]
    # a fixed share plus a training pass per step; a composed RU member adds the pretrained and forget
    # forwards, FU trains on the forget rows too
    ru, fu, lu = (step_cost(tiny(problem=p)) for p in ("reverse_kl", "forward_kl", "likelihood"))
    assert ru == 5 * 64 + 5 * 64 and fu == 5 * 64 + 3 * (64 + 32) and lu == 5 * 64 + 3 * 64
    c = tiny(problem="likelihood")  # 40 + 4 settling steps, LU's 400 constraint chains, 2 x 200 eval chains of 100 steps
    assert member_cost(c) == 44 * lu + 100 * 400 + 2 * 100 * 200
    assert reference_cost(c) == (("likelihood", 0, "likelihood"), 5 * 100 * 400)
    # the default sweep's 15 members in two parts of about equal cost, each reference counted once per part
    cfgs = sweep_configs(ToyConfig())
    m, sh = [member_cost(x) for x in cfgs], [reference_cost(x) for x in cfgs]
    loads = [sum(m[i] for i in p) + sum(dict(sh[i] for i in p).values()) for p in partition(m, 2, sh)]
    assert max(loads) <= 1.03 * (sum(m) + sum(dict(sh).values())) / 2, loads


def test_members_split_across_worker_processes_equal_one_process_bitwise(tmp_path, tiny_pretrained):
    """Three members in two spawned worker processes against the same three in this process: every
    member's multipliers, histories and samples are bitwise equal (a member's arithmetic does not
    depend on the members stacked beside it). The split is recorded and a rerun with another worker
    count reuses it (resuming the parts' complete checkpoints: the same results again)."""
    from toy.core.runs import CheckpointStore

    cfgs = [tiny(pretrained=str(tiny_pretrained), **{"evaluation.surrogate_reference": False}, **kw) for kw in MEMBERS[:3]]
    one = run_ensemble(cfgs, tmp_path / "one", threads=1, workers=1)
    two = run_ensemble(cfgs, tmp_path / "two", threads=1, workers=2)
    rec = json.loads((tmp_path / "two" / "workers.json").read_text())
    assert rec["workers"] == 2 and sorted(i for p in rec["parts"] for i in p) == [0, 1, 2]
    assert [s["workers"] for s in one] == [1, 1, 1] and [s["workers"] for s in two] == [2, 2, 2]
    hist_one = CheckpointStore(tmp_path / "one" / "ensemble-checkpoint").load()[0]["members"]
    hist_two = {}
    for j, part in enumerate(rec["parts"]):
        ck = CheckpointStore(tmp_path / "two" / f"ensemble-checkpoint-{j + 1}of2").load()[0]["members"]
        hist_two.update({i: m["hist"] for i, m in zip(part, ck)})
    for i in range(3):
        assert hist_one[i]["hist"]["lam"] == hist_two[i]["lam"] and hist_one[i]["hist"]["measured"] == hist_two[i]["measured"]
        a = np.load(tmp_path / "one" / f"member-{i:03d}" / "samples.npy")
        b = np.load(tmp_path / "two" / f"member-{i:03d}" / "samples.npy")
        assert np.array_equal(a, b), MEMBERS[i]
        assert np.array_equal(np.asarray(one[i]["lam"]), np.asarray(two[i]["lam"]))
    again = run_ensemble(cfgs, tmp_path / "two", threads=1, workers=1)
    assert [s["workers"] for s in again] == [2, 2, 2]
    for i in range(3):
        assert np.array_equal(np.asarray(again[i]["lam"]), np.asarray(two[i]["lam"]))
        assert again[i]["constraint_values"] == pytest.approx(two[i]["constraint_values"], rel=0, abs=0)


def test_a_failing_worker_process_is_reported_with_its_error(tmp_path):
    from toy.ensemble import train_part
    from toy.workers import run_parts

    cfgs = [tiny(problem=p) for p in ("forward_kl", "likelihood")]
    # raised as itself (the CLI maps exception types to exit codes), the worker's traceback attached
    with pytest.raises(FileNotFoundError, match="missing.pt") as got:
        run_parts(train_part, cfgs, [[0], [1]], tmp_path, {0: str(tmp_path / "missing.pt")})
    assert any("in toy worker" in n and "train_part" in n for n in getattr(got.value, "__notes__", ["in toy worker train_part"]))
    with pytest.raises(ValueError, match="workers must be 'auto' or a positive integer"):
        run_ensemble(cfgs, tmp_path / "bad", workers=0)


def test_a_refused_budget_is_refused_before_pretraining_with_theorys_range(tmp_path):
    """A budget the toy cannot represent is refused by the sweep as by a single run — a ValueError
    naming theory's answer — before any network is pretrained or any worker started."""
    cfgs = [tiny(problem="reverse_kl", budgets=(1000.0,)), tiny(problem="forward_kl")]
    with pytest.raises(ValueError, match="achievable .*theory.gmm.solve.*cannot represent"):
        run_ensemble(cfgs, tmp_path / "ens", workers=2)
    assert not (tmp_path / "ens").exists() or not list((tmp_path / "ens").glob("pretrained-*"))


def _children(pid: int) -> list[int]:
    from tests.procs import live_where

    return live_where("ppid", pid)


def _alive(pid: int) -> bool:
    from tests.procs import live

    return live(pid)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_a_killed_sweep_stops_its_workers_and_resumes_to_the_uninterrupted_result(tmp_path, tiny_pretrained):
    """``toy sweep --workers 2`` SIGKILLed while both workers are parked at their second checkpoint:
    the workers notice their parent is gone and exit (an orphan would go on training into the run
    directory); the rerun, asked for one worker, reuses the recorded two parts, resumes their
    checkpoints and ends with exactly the uninterrupted sweep's multipliers and constraint values."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dualunlearn.cli import main

    over = [f"{k}={json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in TINY.items() if k != "figure"]
    sets = sum((["--set", o] for o in over), []) + ["--set", f"pretrained={json.dumps(str(tiny_pretrained))}"]

    def args(out: str, workers: int) -> list[str]:
        return ["toy", "sweep", "--problems", "forward_kl", "--budgets", "2.5", "--out", str(tmp_path / out),
                "--no-progress", "--no-check", "--threads", "1", "--workers", str(workers)] + sets

    assert main(args("full", 2)) == 0
    marker = tmp_path / "paused"
    env = {**os.environ, "DUALUNLEARN_TEST_PAUSE": "checkpoint-manifest@2", "DUALUNLEARN_TEST_PAUSE_MARKER": str(marker)}
    parent = subprocess.Popen([sys.executable, "-m", "dualunlearn"] + args("cut", 2), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert parent.poll() is None, "the sweep ended before a worker reached its second checkpoint"
            assert time.monotonic() - t0 < 240, "no worker reached its second checkpoint in 240 s"
            time.sleep(0.1)
        workers = _children(parent.pid)
        assert len(workers) >= 2, workers  # the two workers (and the spawn resource tracker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        t0 = time.monotonic()
        while any(_alive(p) for p in workers) and time.monotonic() - t0 < 20:
            time.sleep(0.2)
        assert not [p for p in workers if _alive(p)], "workers outlived their killed parent"
    finally:
        for p in [parent.pid] + _children(parent.pid) + workers:  # no parked orphan outlives a failure
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    assert main(args("cut", 1)) == 0
    full = json.loads((tmp_path / "full" / "sweep.json").read_text())
    cut = json.loads((tmp_path / "cut" / "sweep.json").read_text())
    assert cut["workers"] == 2
    for a, b in zip(full["records"], cut["records"]):
        assert a["lam"] == b["lam"] and a["constraint_values"] == b["constraint_values"], (a["algorithm"], a["lam"], b["lam"])
