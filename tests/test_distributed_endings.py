"""How a distributed command-line run ends when it is interrupted, killed, misconfigured or given
ranks that disagree: every ending with its exit status and one line per rank that speaks
(``graphrepair.cli.launch``, ``graphrepair.distributed.agree_on_function``). Two real processes
(gloo, CPU) started with the environment torchrun sets, each run bounded by a timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_distributed import ROOT, TIMEOUT, _env, _free_port
from tests.helpers import finish_ranks

TIMEOUT_VALUES = ["garbage", "-5", "0", "nan", "inf", "1e30", ""]
DATA = '''
import os, signal, sys, time
import numpy as np
import torch
from torch import nn

def _x():
    return torch.from_numpy(np.load(os.path.join(os.path.dirname(__file__), "fit.npz"))["x"])

def waits_on_rank1():
    """Rank 1 says it is loading and takes its time: rank 0 is then inside a collective."""
    if os.environ.get("RANK") == "1":
        print("LOADING", file=sys.__stderr__, flush=True)
        time.sleep(60)
    return _x()

def waits_on_both():
    print("LOADING", file=sys.__stderr__, flush=True)
    time.sleep(60)
    return _x()

def dies_on_rank0():
    if os.environ.get("RANK") == "0":
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
    return _x()

class Net(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(64, 32), nn.Linear(32, 10), act

    def forward(self, x):
        return self.b(self.act(self.a(x)))

def net():
    return Net(nn.ReLU())

def by_rank():
    """600 examples on rank 0, 300 on rank 1, seeded by rank."""
    g = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    return torch.randn(600 if os.environ.get("RANK", "0") == "0" else 300, 64, generator=g)

def by_rank_watching_teardown():
    """by_rank, and a line in teardown.txt from any rank that tears its group down."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def watched(*args, **kwargs):
        with open(os.path.join(os.path.dirname(__file__), "teardown.txt"), "a") as f:
            f.write(os.environ.get("RANK", "?") + "\\n")
        return destroy(*args, **kwargs)

    dist.destroy_process_group = watched
    return by_rank()

def relu_or_tanh():
    """The same weights, another function on rank 1."""
    return Net(nn.ReLU() if os.environ.get("RANK", "0") == "0" else nn.Tanh())
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from graphrepair.io.fileio import save_safetensors

    d = tmp_path_factory.mktemp("dist_endings")
    (d / "endings_data.py").write_text(DATA)
    sys.path.insert(0, str(d))
    try:
        import endings_data
    finally:
        sys.path.remove(str(d))
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        save_safetensors(endings_data.net().state_dict(), d / f"{name}.safetensors")
    g = torch.Generator().manual_seed(0)
    np.savez(d / "fit.npz", x=torch.randn(300, 64, generator=g).numpy())
    return d


def _args(d: Path, data: str, out: str, model: str = "endings_data:net", n: int = 250) -> list[str]:
    return ["-m", "graphrepair", "merge", "--model", model, "--a", str(d / "a.safetensors"),
            "--b", str(d / "b.safetensors"), "--data", data, "--num-examples", str(n),
            "--out", str(d / f"{out}.onnx")]


def start(d: Path, args: list[str], extra: dict | None = None) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = _env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "PYTHONPATH": f"{ROOT}{os.pathsep}{d}", **(extra or {})})
        procs.append(subprocess.Popen([sys.executable, *args], cwd=d, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def wait_for_marker(proc: subprocess.Popen, marker: str = "LOADING") -> None:
    """Read ``proc``'s stderr up to the marker line (the rank is then where the test wants it)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.strip() == marker:
            return
        if not line and proc.poll() is not None:
            pytest.fail(f"the rank ended before {marker}: {proc.returncode}")
    pytest.fail(f"no {marker} within {TIMEOUT} s")


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    return finish_ranks(procs, TIMEOUT)


def line_of(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() != "LOADING"]
    assert len(lines) == 1 and lines[0].startswith("graphrepair: error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr and "please report" not in stderr
    assert "mismatch" not in stderr.lower() and "terminate called" not in stderr
    return lines[0]


# -- GRAPHREPAIR_DIST_TIMEOUT ------------------------------------------------------------------


@pytest.mark.parametrize("value", TIMEOUT_VALUES)
def test_a_bad_timeout_is_refused_before_joining(value):
    from graphrepair.cli.launch import dist_timeout
    from graphrepair.errors import GraphRepairError

    with pytest.raises(GraphRepairError, match="GRAPHREPAIR_DIST_TIMEOUT=.* greater than 0 and at most 604800"):
        dist_timeout({"GRAPHREPAIR_DIST_TIMEOUT": value})
    assert dist_timeout({}) == 1800.0
    assert dist_timeout({"GRAPHREPAIR_DIST_TIMEOUT": "2.5"}) == 2.5


@pytest.mark.parametrize("value", TIMEOUT_VALUES)
def test_a_bad_timeout_ends_every_rank_alike(work, value):
    """Before: exit 2 on some ranks and SIGTERM on others, 'cannot convert float NaN to integer',
    'Python int too large', -5 accepted and then 'timed out after -5000ms'."""
    ranks = finish(start(work, _args(work, str(work / "fit.npz"), "timeout"), {"GRAPHREPAIR_DIST_TIMEOUT": value}))
    assert [rc for rc, _, _ in ranks] == [2, 2], ranks
    for _, out, err in ranks:
        assert out == ""
        assert f"GRAPHREPAIR_DIST_TIMEOUT={value!r} is not a timeout" in line_of(err)
    assert not list(work.glob("timeout.*"))


# -- signals and deaths ------------------------------------------------------------------------


def test_sigint_to_one_rank_ends_the_run_like_sigterm(work):
    """Rank 0 is inside a collective when rank 1 is interrupted. Before: rank 1 met rank 0 in a
    collective of another size ('gloo::EnforceNotMet ... collective mismatch', exit -6) or rank 0
    reported 'internal error (RankError: on rank 1: 2 (Interrupted)) ... please report it'."""
    procs = start(work, _args(work, "endings_data:waits_on_rank1", "sigint"))
    wait_for_marker(procs[1])
    time.sleep(1.0)  # rank 0 has loaded its data and waits for rank 1
    procs[1].send_signal(signal.SIGINT)
    (rc0, out0, err0), (rc1, out1, err1) = finish(procs)
    assert rc1 == 130 and "interrupted" in line_of(err1)
    assert rc0 == 2 and "lost contact with the other processes of the run" in line_of(err0)
    assert out0 == out1 == ""
    assert not list(work.glob("sigint.*"))


def test_sigterm_to_one_rank_ends_the_run(work):
    procs = start(work, _args(work, "endings_data:waits_on_rank1", "sigterm"))
    wait_for_marker(procs[1])
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGTERM)
    (rc0, _, err0), (rc1, _, err1) = finish(procs)
    assert rc1 == 2 and "terminated (SIGTERM)" in line_of(err1)
    assert rc0 == 2 and "lost contact" in line_of(err0)
    assert not list(work.glob("sigterm.*"))


def test_ctrl_c_to_every_rank_ends_with_130(work):
    """Ctrl-C in a terminal signals the whole foreground process group: every rank gets SIGINT.
    Before: exit 1. (torchrun itself, when it is the one signalled, exits with its own status.)"""
    procs = start(work, _args(work, "endings_data:waits_on_both", "ctrl_c"))
    for p in procs:
        wait_for_marker(p)
    for p in procs:
        p.send_signal(signal.SIGINT)
    ranks = finish(procs)
    assert [rc for rc, _, _ in ranks] == [130, 130], ranks
    for _, out, err in ranks:
        assert out == "" and "interrupted" in line_of(err)
    assert not list(work.glob("ctrl_c.*"))


def test_killed_rank_0_leaves_the_other_with_a_line_of_its_own(work):
    """Rank 0 hosts the store. Before: rank 1 ended without a line of its own."""
    (rc0, _, _), (rc1, out1, err1) = finish(start(work, _args(work, "endings_data:dies_on_rank0", "kill0")))
    assert rc0 == -9
    assert rc1 == 2 and out1 == ""
    assert "lost contact with the other processes of the run" in line_of(err1)
    assert not list(work.glob("kill0.*"))


# -- ranks that disagree -----------------------------------------------------------------------


def test_ranks_computing_different_functions_are_refused(work):
    """The same weights, ReLU on rank 0 and tanh on rank 1. Before: merged with no word (the
    statistics of two functions added together)."""
    ranks = finish(start(work, _args(work, str(work / "fit.npz"), "funcs", model="endings_data:relu_or_tanh")))
    assert [rc for rc, _, _ in ranks] == [2, 2], ranks
    assert "model A computes another function on rank 1 than on rank 0" in line_of(ranks[0][2])
    assert ranks[1][2].strip() == ""  # rank 0 reports
    assert not list(work.glob("funcs.*"))


def test_ranks_with_other_example_counts_merge_and_say_what_was_used(work):
    """600 examples on rank 0 and 300 on rank 1, 600 asked for: in batches of 256, rank 0 streams
    its first batch (256), rank 1 its second, cut short by its data (44). Shares differ in every
    sharded run; before, nothing said what was used; now the report does."""
    import json

    ranks = finish(start(work, _args(work, "endings_data:by_rank", "counts", n=600) + ["--json"]))
    assert [rc for rc, _, _ in ranks] == [0, 0], ranks
    report = json.loads(ranks[0][1])
    assert report["examples"] == 300
    assert ranks[1][1] == "" and ranks[1][2] == "", ranks[1]
    assert "the ranks streamed 256, 44 examples (rank 0 first); the statistics are of all 300 together" \
        in report["notes"]


def test_agree_on_function_tolerates_rounding_and_names_the_difference(monkeypatch):
    """The comparison itself, on one process standing for two ranks: float32 rounding passes,
    another activation does not."""
    from graphrepair import distributed
    from graphrepair.errors import MismatchError

    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    tanh = nn.Sequential(relu[0], nn.Tanh(), relu[2])
    x = torch.randn(2, 8)

    class Fake:
        rank, world = 0, 2

        def __init__(self, other):
            self.other = other

        def all_gather_object(self, obj, kind):
            return [obj, [distributed._output_summary(m, x) for m in self.other]]

    monkeypatch.setattr(distributed, "step", lambda where: contextlib.nullcontext())  # no group to agree in
    monkeypatch.setattr(distributed, "current", lambda: Fake([relu, relu]))
    distributed.agree_on_function([relu, relu], x)
    noisy = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    noisy.load_state_dict(relu.state_dict())
    with torch.no_grad():
        noisy[2].bias.add_(1e-7)  # rounding-sized: the same function
    monkeypatch.setattr(distributed, "current", lambda: Fake([relu, noisy]))
    distributed.agree_on_function([relu, relu], x)
    monkeypatch.setattr(distributed, "current", lambda: Fake([relu, tanh]))
    with pytest.raises(MismatchError, match="model B computes another function on rank 1 than on rank 0"):
        distributed.agree_on_function([relu, relu], x)


def test_a_run_that_merged_ends_without_tearing_its_group_down(work):
    """Tearing a gloo group down after the other rank has left can abort the process in C++ (exit
    -6, nothing said). CI saw it on rank 1 of a run that had merged: rank 0 had reported and left.
    Before: every rank tore its group down at exit; now a run that merged ends as a failed one
    does (``launch.end``): rank 1 first, rank 0 after it, the group left to the system."""
    (work / "teardown.txt").unlink(missing_ok=True)
    ranks = finish(start(work, _args(work, "endings_data:by_rank_watching_teardown", "no_teardown", n=600)))
    assert [rc for rc, _, _ in ranks] == [0, 0], ranks
    assert not (work / "teardown.txt").exists(), (work / "teardown.txt").read_text()
    assert (work / "no_teardown.onnx").stat().st_size > 0
    assert [err for _, _, err in ranks] == ["", ""]
