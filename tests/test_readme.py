"""The README is tested: its set-up commands match CI, and every command and Python example it
shows runs as written, leaving only files that .gitignore lists when run from the repository root.
The first Python example runs from an empty folder outside the repository with only the built
wheel installed (as a new user saves and runs it); the examples marked "from the repository root"
run from a scratch directory that sees the repository's fixtures.

The CLI commands run in this process through click's CliRunner (each subprocess would import torch
again); the console script itself runs as a subprocess in tests/test_packaging.py, and the set-up's
``graphrepair demo`` is the one run from the built wheel that tests/conftest.py makes per session.
"""

from __future__ import annotations

import json
import re
import shlex
import site
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import safetensors.torch
from click.testing import CliRunner

from graphrepair.cli import main

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


def run(command: str, cwd: Path):
    """``graphrepair ARGS [> FILE]`` in this process, from ``cwd`` (the caller's working directory)."""
    argv = shlex.split(command)
    redirect = None
    if ">" in argv:  # a redirection of stdout into a file, as the shell would do it
        at = argv.index(">")
        argv, redirect = argv[:at], argv[at + 1]
    assert argv[0] == "graphrepair", command
    result = CliRunner().invoke(main, argv[1:], catch_exceptions=False)
    if redirect is not None:
        (cwd / redirect).write_text(result.stdout)
    return result


def assert_ignored_by_git(names: set[str]) -> None:
    """Each file or folder the README's commands write into the repository root is in .gitignore."""
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert names and names <= ignored, f"add to .gitignore: {sorted(names - ignored)}"


def test_setup_is_two_commands_and_ci_runs_the_test_command():
    install, tests = setup_commands()
    assert install.startswith("pip install -c constraints.txt -e . && graphrepair demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command must be what .ci/run runs"
    assert "torch==" in (ROOT / "constraints.txt").read_text()


def test_setup_main_job_runs(wheel_demo):
    """The set-up's ``graphrepair demo``, run from an empty folder with the wheel installed."""
    main_job = setup_commands()[0].split("&&", 1)[1].strip()
    assert shlex.split(main_job) == ["graphrepair", *wheel_demo.args]
    res = wheel_demo.result
    assert res.returncode == 0, res.stderr
    out = wheel_demo.cwd / "graphrepair-demo"
    onnx.checker.check_model(onnx.load(str(out / "merged.onnx")))
    assert (out / "barrier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "REPAIR" in res.stdout
    assert_ignored_by_git({p.name for p in wheel_demo.cwd.iterdir()})


def test_cli_quickstart_runs_as_written(scratch):
    pytest.importorskip("mnist")
    for command in cli_commands():
        res = run(command, scratch)
        assert res.exit_code == 0, f"{command}\n{res.stderr}"
    assert "digraph" in (scratch / "resnet20.dot").read_text()
    spec = json.loads((scratch / "gpt2_spec.json").read_text())
    assert spec["totals"]["free_channels"] > 0
    for f in ("merged.onnx", "mlp10_merged.onnx"):
        onnx.checker.check_model(onnx.load(str(scratch / f)))
    state = safetensors.torch.load_file(str(scratch / "merged.safetensors"))
    assert "1.weight" in state
    assert (scratch / "barrier.png").read_bytes()[:4] == b"\x89PNG"
    assert_ignored_by_git({p.name for p in scratch.iterdir()} - {"fixtures"})


def test_first_example_runs_from_any_folder_with_the_installed_package(wheel_site, tmp_path):
    """The README's first Python example, saved as a file in an empty folder outside the repository
    and run by an interpreter that sees the wheel's packages and the installed dependencies only
    (``python -I -S``: no PYTHONPATH, no working directory, no .pth of an editable install)."""
    first = blocks("python")[0]
    assert "fixtures" not in first
    cwd = tmp_path / "anywhere"
    cwd.mkdir()
    (cwd / "first.py").write_text(first)
    path = [str(wheel_site), *site.getsitepackages()]
    code = (f"import runpy, sys; sys.path[:0] = {path!r}; "
            "import graphrepair; print('FROM', graphrepair.__file__); "
            "runpy.run_path('first.py', run_name='__main__'); "
            "print('FIXTURES', sorted(m for m in sys.modules if m.split('.')[0] == 'fixtures'))")
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert Path(lines[0].split(" ", 1)[1]).is_relative_to(wheel_site), lines[0]  # the wheel's graphrepair
    assert lines[-1] == "FIXTURES []"
    assert lines[1].split() == ["8", "512"]  # what the comment says: 8 groups, 512 channels
    acc = {line.split(":")[0]: float(line.split()[-1].rstrip("%")) for line in lines[2:5]}
    assert list(acc) == ["A", "B", "merged"] and min(acc.values()) > 90, acc
    nodes, diff = lines[5].split()
    assert int(nodes) > 0 and float(diff) < 1e-4
    onnx.checker.check_model(onnx.load(str(cwd / "merged_first.onnx")))
    assert sorted(p.name for p in cwd.iterdir()) == ["first.py", "merged_first.onnx"]
    assert_ignored_by_git({"merged_first.onnx"})


def test_python_quickstart_runs_as_written(scratch):
    pytest.importorskip("mnist")
    _, quickstart, refit = blocks("python")  # the third (the refit) runs on the second's names
    namespace: dict = {}
    exec(compile(quickstart, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["accuracy"] > 0.9
    exec(compile(refit, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["curve"].label == "activation + exact + refit"
    assert namespace["curve"].accuracy[len(namespace["curve"].alphas) // 2] > 0.9
    assert namespace["report"].max_abs_diff < 1e-4
    assert (scratch / "merged_python.onnx").exists()
    assert_ignored_by_git({p.name for p in scratch.iterdir()} - {"fixtures"})
