"""The README is tested: its set-up commands match CI, and every command and Python example it
shows runs as written (from a scratch directory that sees the repository's fixtures)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import safetensors.torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def setup_commands() -> list[str]:
    return [line for line in blocks("bash")[0].splitlines() if line.strip()]


def cli_commands() -> list[str]:
    return [line for line in blocks("bash")[1].splitlines() if line.strip()]


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if ">" in command:  # a redirection: let the shell do it
        return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    return subprocess.run(shlex.split(command), cwd=cwd, env=env, capture_output=True, text=True)


def test_setup_is_two_commands_and_ci_runs_the_test_command():
    install, tests = setup_commands()
    assert install.startswith("pip install -c constraints.txt -e . && graphrepair demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command must be what .ci/run runs"
    assert "torch==" in (ROOT / "constraints.txt").read_text()


def test_setup_main_job_runs(scratch):
    main_job = setup_commands()[0].split("&&", 1)[1].strip()
    res = run(main_job, scratch)
    assert res.returncode == 0, res.stderr
    out = scratch / "graphrepair-demo"
    onnx.checker.check_model(onnx.load(str(out / "merged.onnx")))
    assert (out / "barrier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "REPAIR" in res.stdout


def test_cli_quickstart_runs_as_written(scratch):
    pytest.importorskip("mnist")
    for command in cli_commands():
        res = run(command, scratch)
        assert res.returncode == 0, f"{command}\n{res.stderr}"
    assert "digraph" in (scratch / "resnet20.dot").read_text()
    spec = json.loads((scratch / "gpt2_spec.json").read_text())
    assert spec["totals"]["free_channels"] > 0
    for f in ("merged.onnx", "mlp10_merged.onnx"):
        onnx.checker.check_model(onnx.load(str(scratch / f)))
    state = safetensors.torch.load_file(str(scratch / "merged.safetensors"))
    assert "1.weight" in state
    assert (scratch / "barrier.png").read_bytes()[:4] == b"\x89PNG"


def test_python_quickstart_runs_as_written(scratch):
    pytest.importorskip("mnist")
    (code,) = blocks("python")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["accuracy"] > 0.9
    assert namespace["report"].max_abs_diff < 1e-4
    assert (scratch / "merged_python.onnx").exists()
