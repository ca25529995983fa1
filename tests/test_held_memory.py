"""CPU memory is held for reuse around API calls (``runtime.held_memory``): large activations land
on pages already faulted in, instead of a fresh mapping per batch; the free memory is returned
when the outermost call ends."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest
import torch
from torch import nn

import graphrepair as gr
from graphrepair import runtime

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


class _Libc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


_PROBE = """
import resource, torch
from graphrepair import runtime

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def repeated(k=12, n=64 << 18):  # 64 MB of float32, allocated, filled and freed k times
    torch.ones(n).sum()
    before = faults()
    for _ in range(k):
        torch.ones(n).sum()
    return faults() - before

outside = repeated()
with runtime.held_memory():
    inside = repeated()
print(outside, inside, repeated())
"""

BLOCKS = 12


def _run(env) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    outside, inside, after = map(int, out.stdout.split())
    return outside, inside, after


@glibc
def test_large_blocks_are_reused_once_memory_is_held():
    """glibc maps a 64 MB block afresh each time (above its 32 MB ceiling): every page of every
    block faults. Held, the blocks reuse the first one's pages, and the thresholds stay raised
    after the call. (Measured here: 12 blocks fault 196,620 pages outside, 0-49,152 inside: now
    and then a block still lands on fresh pages, so the test asks for most of them to be reused.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GRAPHREPAIR_MALLOC")}
    outside, inside, after = _run(env)
    pages = (64 << 20) // resource.getpagesize()
    assert outside > BLOCKS * pages // 2
    assert inside < outside // 2
    assert after < outside // 2


_TOP = """
import ctypes, torch
from graphrepair import runtime

class Info(ctypes.Structure):  # glibc's struct mallinfo2 (2.33 and later)
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def batch():  # 2 x 560 MB, each below the mmap threshold, freed on return: 1.1 GB free at the top
    a, b = torch.ones(560 << 18), torch.ones(560 << 18)
    return libc.mallinfo2().arena, float(a[-1] + b[-1])

with runtime.held_memory():
    for _ in range(3):  # whether the old threshold trimmed depended on what lay above the blocks
        peak, _ = batch()
        print(peak, libc.mallinfo2().arena)  # bytes the heap holds from the system, then and after
"""


@glibc
def test_free_memory_is_not_given_back_inside_a_call():
    """A batch that frees more than the trim threshold at the top of the heap: inside a call the
    heap keeps it for the next batch (with the 1 GiB threshold of before, it went back to the
    system whenever nothing small lay above it, in about half of the runs here, and the next batch
    faulted all of it in again); ``malloc_trim`` gives it back when the outermost call ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GRAPHREPAIR_MALLOC")}
    out = subprocess.run([sys.executable, "-c", _TOP], env=env, capture_output=True, text=True)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc before 2.33 (no mallinfo2)")
    assert out.returncode == 0, out.stderr
    held = list(map(int, out.stdout.split()))
    assert len(held) == 6 and held[0] > (1100 << 20)
    for peak, inside in zip(held[::2], held[1::2]):
        assert inside >= peak - (16 << 20)


@glibc
def test_nothing_is_held_when_the_user_opts_out():
    env = {**os.environ, "GRAPHREPAIR_MALLOC": "system"}
    env.pop("GLIBC_TUNABLES", None)
    pages = (64 << 20) // resource.getpagesize()
    assert all(v > BLOCKS * pages // 2 for v in _run(env))


def test_thresholds_are_raised_once_for_nested_calls_and_memory_trimmed_after(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    with runtime.held_memory():
        with runtime.held_memory():
            pass
        assert libc.calls == [("mallopt", -3, 1 << 30), ("mallopt", -1, -1)]  # no trimming inside
    assert libc.calls[2:] == [("mallopt", -1, 1 << 30), ("trim", 0)]
    assert runtime._depth == 0


def test_set_back_when_the_call_raises(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    with pytest.raises(gr.GraphRepairError):
        gr.merge_models([nn.Linear(3, 3), nn.Conv2d(3, 3, 1)], torch.randn(4, 3))
    assert [c[0] for c in libc.calls] == ["mallopt", "mallopt", "mallopt", "trim"]
    assert runtime._depth == 0


@pytest.mark.parametrize("env", [{"GRAPHREPAIR_MALLOC": "system"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_the_users_choice_stands(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert runtime._glibc() is None


def test_every_api_call_holds_memory(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    b = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 6)
    merged = gr.merge(a, b, x)
    assert [c[0] for c in libc.calls] == ["mallopt", "mallopt", "mallopt", "trim"]
    # what the merge computes does not depend on the allocator
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    again = gr.merge(a, b, x)
    assert torch.equal(merged(x), again(x))
