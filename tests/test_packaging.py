"""The house: what the wheel holds, what it requires where, that ``passes`` stands alone, that the
demo runs from the wheel alone in any folder, and that the console script imports MODULE:FACTORY
modules from the working directory."""

from __future__ import annotations

import ast
import json
import os
import site
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import onnx
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# passes/ never imports graphrepair


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``: statements at any depth (inside
    functions too) and ``importlib.import_module``/``__import__`` calls with a literal name.
    Relative imports (``from . import x``) stay inside their package and are left out."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_import_scan_sees_nested_and_dynamic_imports():
    code = ("import os\nfrom . import base\ndef f():\n    import graphrepair.errors\n"
            "    from graphrepair import merge\n    return importlib.import_module('graphrepair.cli')\n")
    assert imported_modules(ast.parse(code)) == [
        (1, "os"), (4, "graphrepair.errors"), (5, "graphrepair"), (6, "graphrepair.cli")]


def test_passes_never_imports_graphrepair():
    files = sorted((ROOT / "passes").rglob("*.py"))
    assert len(files) > 5
    offending = [f"{path.relative_to(ROOT)}:{line}: {name}"
                 for path in files
                 for line, name in imported_modules(ast.parse(path.read_text(), str(path)))
                 if name == "graphrepair" or name.startswith("graphrepair.")]
    assert offending == [], "passes/ is the generic layer and must not import graphrepair:\n" + "\n".join(offending)


# --------------------------------------------------------------------------------------------------
# The wheel


def test_wheel_holds_graphrepair_and_passes_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"graphrepair", "passes"}
    assert len(top) == 3  # and one graphrepair-VERSION.dist-info
    for module in ("graphrepair/__init__.py", "graphrepair/cli/__init__.py", "graphrepair/demo/data.py",
                   "graphrepair/demo/model.py", "graphrepair/demo/train.py", "passes/__init__.py"):
        assert module in names
    assert not [n for n in names if n.startswith(("fixtures/", "tests/", "scripts/", "benchmarks/"))]
    sources = {p.relative_to(ROOT).as_posix() for d in ("graphrepair", "passes") for p in (ROOT / d).rglob("*.py")}
    assert sources <= set(names), "every module of the two packages is in the wheel"


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta).decode()
    return [Requirement(r) for r in Parser().parsestr(text).get_all("Requires-Dist")]


PLATFORMS = {  # (sys_platform, platform_system, platform_machine, os_name)
    "macos-arm64": ("darwin", "Darwin", "arm64", "posix"),
    "macos-x86_64": ("darwin", "Darwin", "x86_64", "posix"),
    "linux-x86_64": ("linux", "Linux", "x86_64", "posix"),
    "linux-aarch64": ("linux", "Linux", "aarch64", "posix"),
    "windows-amd64": ("win32", "Windows", "AMD64", "nt"),
    "windows-arm64": ("win32", "Windows", "ARM64", "nt"),
}
HAS_ORT_GPU_WHEELS = {"linux-x86_64", "windows-amd64"}  # onnxruntime-gpu's PyPI wheels


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_wheel_requires_one_onnxruntime_per_platform(wheel, platform):
    """onnxruntime-gpu where PyPI has wheels for it, onnxruntime elsewhere, never both (they share
    one folder); the other requirements apply everywhere."""
    sys_platform, system, machine, os_name = PLATFORMS[platform]
    env = dict(default_environment(), sys_platform=sys_platform, platform_system=system,
               platform_machine=machine, os_name=os_name, python_version="3.11", python_full_version="3.11.9",
               extra="")
    wanted = {r.name for r in requirements(wheel) if r.marker is None or r.marker.evaluate(env)}
    runtime = wanted & {"onnxruntime", "onnxruntime-gpu"}
    assert runtime == ({"onnxruntime-gpu"} if platform in HAS_ORT_GPU_WHEELS else {"onnxruntime"})
    assert {"torch", "numpy", "scipy", "onnx", "onnxscript", "safetensors", "click", "rich", "matplotlib",
            "scikit-learn"} <= wanted
    assert not wanted & {"pytest", "hypothesis", "transformers"}  # the test extra only


# --------------------------------------------------------------------------------------------------
# The demo from the wheel alone, and the console script


def test_demo_runs_from_the_wheel_alone(wheel_demo, wheel_site):
    """``graphrepair demo`` in an empty folder with only the wheel's packages importable (no
    repository on the path, no fixtures): it trains, merges and writes a verified merged.onnx."""
    run = wheel_demo
    assert run.result.returncode == 0, run.result.stderr
    probe = run.probe
    assert Path(probe["graphrepair"]).is_relative_to(wheel_site)
    assert Path(probe["passes"]).is_relative_to(wheel_site)
    assert str(ROOT) not in probe["path"] and "" not in probe["path"] and str(run.cwd) not in probe["path"]
    # ``import fixtures`` fails (unless PyPI's unrelated package of that name is installed there)
    found = probe["fixtures_found"]
    assert found is None or any(Path(found).is_relative_to(d) for d in site.getsitepackages()), found
    assert probe["fixtures_imported"] == []
    out = run.cwd / "graphrepair-demo"
    assert sorted(p.name for p in out.iterdir()) == ["barrier.png", "layers.png", "merged.onnx"]
    onnx.checker.check_model(onnx.load(str(out / "merged.onnx")))
    assert "onnxruntime agrees with torch" in run.result.stdout


def test_console_script_imports_modules_from_the_working_directory(tmp_path):
    """``graphrepair inspect --model factories:tiny`` from the folder that holds factories.py: the
    installed console script (unlike ``python -m``) does not put that folder on the path itself."""
    script = Path(sys.executable).parent / ("graphrepair.exe" if sys.platform == "win32" else "graphrepair")
    assert script.exists(), f"no console script at {script}: install the package (see the README)"
    (tmp_path / "factories.py").write_text(
        "from torch import nn\n\ndef tiny():\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's graphrepair
    res = subprocess.run([str(script), "inspect", "--model", "factories:tiny", "--input-shape", "2,8", "--json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["totals"]["free_channels"] == 16
