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
        assert libc.calls == [("mallopt", -3, 1 << 30), ("mallopt", -1, 1 << 30)]
    assert libc.calls[2:] == [("trim", 0)]
    assert runtime._depth == 0


def test_set_back_when_the_call_raises(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    with pytest.raises(gr.GraphRepairError):
        gr.merge_models([nn.Linear(3, 3), nn.Conv2d(3, 3, 1)], torch.randn(4, 3))
    assert [c[0] for c in libc.calls] == ["mallopt", "mallopt", "trim"]
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
    assert [c[0] for c in libc.calls] == ["mallopt", "mallopt", "trim"]
    # what the merge computes does not depend on the allocator
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    again = gr.merge(a, b, x)
    assert torch.equal(merged(x), again(x))


class _LibcWithInfo(_Libc):
    """A C library that says how much its heap holds free (``mallinfo2``)."""

    def __init__(self, free: int):
        super().__init__()
        self.free = free

    def mallinfo2(self):
        return runtime._MallInfo2(fordblks=self.free)


@pytest.mark.parametrize("free,trimmed", [(0, False), (runtime._KEEP_FREE, False),
                                          (runtime._KEEP_FREE + 1, True), (8 << 30, True)])
def test_a_little_free_memory_is_kept_for_the_next_call(monkeypatch, free, trimmed):
    """Up to ``_KEEP_FREE`` bytes free, the heap is not trimmed when the outermost call ends (the
    next call reuses those pages instead of faulting them in again); more is given back."""
    libc = _LibcWithInfo(free)
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    with runtime.held_memory():
        with runtime.held_memory():
            pass
        assert ("trim", 0) not in libc.calls  # (never inside a call)
    assert (("trim", 0) in libc.calls) is trimmed
    assert runtime._depth == 0


@glibc
def test_the_heaps_free_memory_is_read_from_glibc():
    """glibc's own statistics: a freed block of 32 MB inside a call (taken from the heap, the
    thresholds raised) is free heap until the call ends, and a heap with more than ``_KEEP_FREE``
    free is trimmed then."""
    libc = runtime._libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2 (before 2.33)")
    if runtime._glibc() is None:
        pytest.skip("the allocator is left alone here (GRAPHREPAIR_MALLOC or GLIBC_TUNABLES)")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    assert runtime._free_bytes(libc) >= 0
    with runtime.held_memory():
        block = torch.ones(128 << 18)  # 128 MB of float32, every page touched
        del block
        assert runtime._free_bytes(libc) >= (128 << 20)
        held = resident()
    assert resident() < held - (64 << 20)  # more than _KEEP_FREE free: given back
