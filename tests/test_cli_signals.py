"""Real processes (``python -m graphrepair``): signals at several points of a merge, and what only a
real stderr shows (torch's logging, warnings printed by C++).

All processes start at once (they spend most of their time importing torch) and each gets its
signal at its point: while torch is being imported (``python -X importtime`` reports each module
on stderr as it is imported), after a marker the data prints in the middle of the statistics pass,
after a marker the model prints inside the ONNX exporter. Every one must end with 128 + the signal,
one line saying "interrupted" (and, past the up-front checks, that no output was written), and its
output folder exactly as before (the old outputs intact, no temporary file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests import hostile_models

ROOT = Path(__file__).resolve().parents[1]
M = "tests.hostile_models"
OLD = b"old output, must survive"
MARKERS = ("PASSING", "EXPORTING")
IMPORTING = "torch import"  # signal at the first "import time: ... torch..." line


def noise(line: str) -> bool:
    return line.strip() in MARKERS or line.startswith("import time:")


def merge_args(d: Path, out: Path, model: str = "mlp", data: str | None = None) -> list[str]:
    return ["merge", "--model", f"{M}:{model}", "--a", str(d / f"{model}_a.safetensors"),
            "--b", str(d / f"{model}_b.safetensors"), "--data", data or str(d / "fit.npz"),
            "--out", str(out / "merged.onnx"), "--weights", str(out / "w.safetensors")]


RUNS = {
    # name: (arguments(d, out), signal, when: seconds after start or a marker, expected exit)
    "SIGINT while importing": (lambda d, o: merge_args(d, o), signal.SIGINT, IMPORTING, 130),
    "SIGTERM in the statistics pass": (lambda d, o: merge_args(d, o, data=f"{M}:slow_batches"),
                                       signal.SIGTERM, "PASSING", 143),
    "SIGHUP in the statistics pass": (lambda d, o: merge_args(d, o, data=f"{M}:slow_batches"),
                                      signal.SIGHUP, "PASSING", 129),
    "SIGINT in the statistics pass": (lambda d, o: merge_args(d, o, data=f"{M}:slow_batches"),
                                      signal.SIGINT, "PASSING", 130),
    "SIGINT in the ONNX exporter": (lambda d, o: merge_args(d, o, model="slow_export"),
                                    signal.SIGINT, "EXPORTING", 130),
    "SIGTERM in the ONNX exporter": (lambda d, o: merge_args(d, o, model="slow_export"),
                                     signal.SIGTERM, "EXPORTING", 143),
    # no signal: one line although torch logs warnings and dumps graphs while it fails
    "data-dependent control flow": (lambda d, o: merge_args(d, o, model="data_dependent"), None, None, 2),
    # the README's example: no torch warning
    "README gpt2_tiny": (lambda d, o: ["inspect", "--model", "fixtures.zoo:gpt2_tiny", "--input-shape", "1,16",
                                       "--input-dtype", "long", "--vocab", "100", "--json"], None, None, 0),
}


class Run:
    def __init__(self, name: str, args: list[str], sig, when, out: Path):
        env = dict(os.environ, PYTHONPATH=str(ROOT), GRAPHREPAIR_TEST_DATA=str(out.parent / "functions.npz"))
        self.name, self.sig, self.when, self.out = name, sig, when, out
        python = [sys.executable] + (["-X", "importtime"] if when == IMPORTING else [])
        self.proc = subprocess.Popen([*python, "-m", "graphrepair", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.signalled = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            due = line.strip() == self.when or (self.when == IMPORTING and line.startswith("import time:")
                                                 and "torch" in line)
            if self.sig is not None and due and not self.signalled:
                self.signalled = True
                self.proc.send_signal(self.sig)

    def finish(self) -> tuple[int, str, str]:
        try:
            stdout = self.proc.stdout.read()
            self.proc.wait(timeout=240)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(timeout=10)
        return self.proc.returncode, stdout, "".join(self.lines)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("signals")
    hostile_models.write_inputs(d)
    started = {}
    for name, (args, sig, when, _) in RUNS.items():
        out = d / name.replace(" ", "_")
        out.mkdir()
        (out / "merged.onnx").write_bytes(OLD)
        (out / "w.safetensors").write_bytes(OLD)
        started[name] = Run(name, args(d, out), sig, when, out)
    return {name: (run, *run.finish()) for name, run in started.items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_real_process(runs, name):
    run, code, stdout, stderr = runs[name]
    expected = RUNS[name][3]
    lines = [line for line in stderr.strip().splitlines() if not noise(line)]
    assert code == expected, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr
    if expected == 0:
        assert lines == [], stderr
        return
    assert len(lines) == 1 and lines[0].startswith("graphrepair: error: "), stderr
    if run.sig is not None:
        assert run.signalled
        assert "interrupted" in lines[0], lines[0]
        if run.when in MARKERS:  # past the up-front checks: the outputs were planned
            assert "no output was written" in lines[0], lines[0]
    else:
        assert "cannot trace DataDependent" in lines[0]
    files = {p.name: p.read_bytes() for p in run.out.iterdir()}
    assert files == {"merged.onnx": OLD, "w.safetensors": OLD}, sorted(files)


def test_closed_stdout_is_not_an_error(tmp_path):
    """``graphrepair inspect ... | head -1``: the reader is gone before the report is written (the
    reading end is closed at once): exit 0, nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "graphrepair", "inspect", "--model", f"{M}:mlp",
                             "--input-shape", "2,64"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert err == b""
