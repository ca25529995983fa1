"""Statistics on torch.distributed: two processes (gloo on the CPU, started here with the rendezvous
environment torchrun sets, or by torchrun itself) give the answer of one process over the same
examples, and a failure on one rank ends both.

The two-process runs are ``tests/dist_worker.py`` (the Python API, each rank passing its own share)
and the CLI; every run is bounded by a timeout. One-process answers are computed here with one
thread, as the workers use.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from graphrepair.merging.activation_match import tie_safe
from graphrepair.merging.assign import lap
from tests.helpers import finish_ranks

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds for one two-process run, start-up included (a loaded 2-core machine)
CASES = ["mlp", "mlp_one_batch", "align_weight", "resnet", "resnet_reset", "heads", "groups", "barrier", "study",
         "refit"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({"OMP_NUM_THREADS": "1", "GRAPHREPAIR_DIST_TIMEOUT": "60"})
    env.update(extra or {})
    return env


def launch(args: list[str], cwd: Path, extra_env: dict | None = None, timeout: float = TIMEOUT):
    """Start ``python ARGS`` as ranks 0 and 1 of a gloo group (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK, LOCAL_WORLD_SIZE); [(returncode, stdout, stderr)] per rank. Both are killed at the
    timeout, which fails the test."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = _env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(extra_env or {})})
        procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return finish_ranks(procs, timeout, f": {args}")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tie-breaking and sharding (no processes) -----------------------------------------------------

def test_ties_are_broken_by_a_rule_that_summation_order_cannot_change():
    """Correlation matrices that differ only in the last bits (sums added in another order) give
    the same assignment, dead units (rows and columns of exact zeros) included."""
    torch.manual_seed(0)
    c = torch.rand(8, 8).double() * 0.5
    c[[1, 4]] = 0.0  # dead units of A
    c[:, [2, 6]] = 0.0  # dead units of B
    c[3, 5] = c[3, 7] = c[0, 5] = c[0, 7] = 0.9  # two equally good pairings
    base = lap(tie_safe(c))
    for seed in range(20):
        noise = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed)).double() * 1e-12
        assert torch.equal(lap(tie_safe(c + noise * (c != 0))), base)


def test_shard_cuts_whole_batches_in_contiguous_blocks():
    from graphrepair.io.data import ArrayDataset
    from graphrepair.io.examples import Examples

    def shares(data, n, bs, world=2):
        return [Examples(data, n, bs).shard(r, world) for r in range(world)]

    def joined(part, labels=False):
        return torch.cat([b.labels if labels else b.inputs.first for b in part])

    x = torch.arange(100.0)[:, None]
    a, b = shares(x, 100, 16)  # 7 batches: 3 and 4
    assert (a.count, b.count) == (48, 52) and torch.equal(torch.cat([joined(a), joined(b)]), x)
    a, b = shares(ArrayDataset(x, torch.arange(100)), 90, 16)
    assert (a.count, b.count) == (48, 42) and torch.equal(joined(b, labels=True), torch.arange(48, 90))
    a, b = shares(x, 10, 16)  # one batch: rank 0 has none
    assert (a.count, b.count) == (0, 10) and a.empty and list(a) == []
    batches = [x[i:i + 30] for i in range(0, 100, 30)]  # a list: split by batch, after the first n
    a, b = shares(batches, 70, 30)
    assert (a.count, b.count) == (30, 40) and len(list(a)) == 1 and len(list(b)) == 2
    three = shares(x, 100, 16, world=3)
    assert [p.count for p in three] == [32, 32, 36]


# -- two processes ----------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def test_two_ranks_give_the_one_process_answer_and_a_bad_rank_ends_both(tmp_path, one_thread):
    """Python API, each rank passing its share (uneven: 7 batches as 3 + 4; one batch: rank 0 has
    none), for an MLP with dead units (exact REPAIR; closed form on the one batch; weight matching
    by ``gr.align``, one rank without data), a BatchNorm ResNet20 (exact REPAIR; BatchNorm reset), a transformer whose heads and head dims are aligned
    jointly, a GroupNorm and grouped-conv net whose whole groups move, a barrier curve, the per-layer measurements and a merge with the least-squares refit:
    the permutations of one process, merged weights within 1e-6 (relative to each tensor's
    largest value), every rank the same. Then rank 1's data turns bad half way through its pass:
    both ranks end with that error, rank 0 long before its own pass would have ended."""
    from tests.dist_worker import answer, build

    ranks = launch(["-m", "tests.dist_worker", str(tmp_path), *CASES, "fail"], ROOT)
    assert [code for code, _, _ in ranks] == [2, 2], ranks  # 2: the last case failed, as meant to
    for case in CASES:
        got = [torch.load(tmp_path / f"{case}.rank{r}.pt") for r in (0, 1)]
        assert all("error" not in g for g in got), (case, got)
        models, x, y, n, bs, _ = build(case)
        ref = answer(case, x[:n], None if y is None else y[:n])
        if case == "barrier":
            for g in got:
                assert g["accuracy"] == ref["accuracy"]
                np.testing.assert_allclose(g["loss"], ref["loss"], rtol=1e-6)
            continue
        if case == "align_weight":  # weight matching by gr.align, rank 1 without data
            for g in got:
                assert g["perms"].keys() == ref["perms"].keys()
                assert all(torch.equal(g["perms"][k], p) for k, p in ref["perms"].items())
            assert any(not torch.equal(p, torch.arange(len(p))) for p in ref["perms"].values())
            continue
        if case == "study":
            for g in got:
                for (ratios, cosines), (ref_ratios, ref_cosines) in zip(g["layers"], ref["layers"], strict=True):
                    for label, v in ref_ratios.items():
                        assert ratios[label] == pytest.approx(v, rel=1e-6)
                        assert cosines[label] == pytest.approx(ref_cosines[label], rel=1e-6)
            continue
        for g in got:
            assert g["examples"] == ref["examples"] == n and g["dead"] == ref["dead"]
            assert ref["perms"].keys() == g["perms"].keys()
            for group, p in ref["perms"].items():
                assert torch.equal(g["perms"][group], p), (case, group)
            for k, v in ref["state"].items():
                if v.is_floating_point():
                    assert _rel(g["state"][k], v) <= 1e-6, (case, k, _rel(g["state"][k], v))
                assert torch.equal(g["state"][k], got[0]["state"][k]), (case, k)  # every rank the same
    orders = [p for k, p in torch.load(tmp_path / "groups.rank0.pt")["perms"].items() if k.endswith(".o")]
    assert orders and any(not torch.equal(p, torch.arange(len(p))) for p in orders)  # groups moved
    if_dead = torch.load(tmp_path / "mlp.rank0.pt")["dead"]
    assert if_dead > 0  # the MLP's ties were there to be broken
    failed = [torch.load(tmp_path / f"fail.rank{r}.pt") for r in (0, 1)]
    assert failed[1]["error"] == "DataError: batch 2 of rank 1 is bad on purpose"
    assert failed[0]["error"] == "DataError: on rank 1: batch 2 of rank 1 is bad on purpose"
    # rank 0 stopped early: its share of the examples takes longer than the whole failing run, on
    # one thread as the workers run (with two, a merge sped up by the joint pass came within 1% of
    # the failing run's fixed costs)
    models, x, _, n, bs, _ = build("fail")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = time.perf_counter()
        answer("fail", x[:n // 2], num_examples=n // 2)
        took = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    assert failed[0]["seconds"] < took, (failed[0]["seconds"], took)


@pytest.fixture(scope="module")
def cli_work(tmp_path_factory) -> Path:
    from fixtures.zoo import mlp3
    from graphrepair.io.fileio import save_safetensors

    d = tmp_path_factory.mktemp("dist_cli")
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        save_safetensors(mlp3().state_dict(), d / f"{name}.safetensors")
    g = torch.Generator().manual_seed(0)
    np.savez(d / "fit.npz", x=torch.randn(300, 64, generator=g).numpy())
    np.savez(d / "test.npz", x=torch.randn(100, 64, generator=g).numpy(),
             y=torch.randint(0, 10, (100,), generator=g).numpy())
    (d / "dist_data.py").write_text(
        "import os, signal\nimport numpy as np\nimport torch\n\n"
        "def _x():\n    return torch.from_numpy(np.load(os.path.join(os.path.dirname(__file__), 'fit.npz'))['x'])\n\n"
        "def bad_on_rank1():\n    x = _x()\n    return x[:, :60] if os.environ.get('RANK') == '1' else x\n\n"
        "def dies_on_rank1():\n    if os.environ.get('RANK') == '1':\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _x()\n")
    return d


def _merge_args(d: Path, data: str, out: str) -> list[str]:
    return ["merge", "--model", "fixtures.zoo:mlp3", "--a", str(d / "a.safetensors"), "--b", str(d / "b.safetensors"),
            "--data", data, "--num-examples", "250", "--out", str(d / f"{out}.onnx"),
            "--weights", str(d / f"{out}.safetensors")]


def test_cli_under_torchrun_gives_the_one_process_answer(cli_work, one_thread):
    from click.testing import CliRunner

    from graphrepair.cli import main

    d = cli_work
    args = _merge_args(d, str(d / "fit.npz"), "two") + ["--no-onnx", "--eval", str(d / "test.npz"), "--json"]
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "graphrepair", *args],
                         cwd=d, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(run.stdout)  # one report: rank 0's
    one_run = CliRunner().invoke(main, [a.replace("two.", "one.") for a in args], catch_exceptions=False)
    assert one_run.exit_code == 0, one_run.output
    one = json.loads(one_run.stdout)
    assert two["examples"] == one["examples"] == 250
    assert two["eval"] == one["eval"]
    for g, c in one["mean_corr"].items():
        assert two["mean_corr"][g] == pytest.approx(c, rel=1e-9)
    w1, w2 = load_file(d / "one.safetensors"), load_file(d / "two.safetensors")
    assert w1.keys() == w2.keys() and all(_rel(w2[k], w1[k]) <= 1e-6 for k in w1)
    assert not [p for p in d.iterdir() if p.name.startswith("graphrepair-rank-")]


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphrepair: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_cli_bad_data_on_one_rank_ends_both_with_exit_2_and_one_line(cli_work):
    d = cli_work
    t = time.monotonic()
    (rc0, out0, err0), (rc1, out1, err1) = launch(
        ["-m", "graphrepair", *_merge_args(d, "dist_data:bad_on_rank1", "bad")], d, {"PYTHONPATH": f"{ROOT}{os.pathsep}{d}"})
    assert (rc0, rc1) == (2, 2)
    line = _one_line(err0)
    assert "on rank 1: --data dist_data:bad_on_rank1" in line and "cannot run on its examples" in line
    assert err1.strip() == "" and out0 == out1 == ""  # one rank reports
    assert not list(d.glob("bad.*"))
    assert time.monotonic() - t < TIMEOUT


def test_cli_killed_rank_ends_the_other_with_a_clear_error_and_no_file(cli_work):
    d = cli_work
    (rc0, _, err0), (rc1, _, _) = launch(
        ["-m", "graphrepair", *_merge_args(d, "dist_data:dies_on_rank1", "dies")], d, {"PYTHONPATH": f"{ROOT}{os.pathsep}{d}"})
    assert rc1 == -9 and rc0 == 2
    assert "lost contact with the other processes of the run" in _one_line(err0)
    assert not list(d.glob("dies.*"))


@pytest.mark.parametrize("processes, gpus, auto, cuda", [
    ("2", 1, ["cpu", "cpu"], "each process needs its own GPU; start at most 1 per node"),
    ("2", 2, ["cuda:0", "cuda:1"], None),
    (None, 1, ["cuda:0", "cpu"], "with 2 processes on this node but torch sees 1 GPU"),
])
def test_device_choice_under_a_launcher_agrees_across_the_node(monkeypatch, processes, gpus, auto, cuda):
    """With fewer GPUs than processes on a node, nccl cannot run: "auto" must pick the CPU on every
    rank alike (seen: torchrun with 2 processes on a one-GPU machine hung rank 0 in nccl while rank
    1 failed), "cuda" must fail on every rank before any joins. Without LOCAL_WORLD_SIZE a rank knows
    only those up to itself."""
    from graphrepair.errors import GraphRepairError
    from graphrepair.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    for rank in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert str(pick_device("auto")) == auto[rank]
        if cuda is None:
            assert str(pick_device("cuda")) == f"cuda:{rank}"
        elif processes is not None or rank == 1:
            with pytest.raises(GraphRepairError, match=cuda.replace("(", r"\(")):
                pick_device("cuda")
