"""Session fixtures: the expensive things several test modules share, made once per session.

``digits_pair``: two 3-hidden-layer MLPs (width 32) trained on scikit-learn's digits from seeds 0
and 1, with the training data; ``digits_spec``: their PermutationSpec, discovered once;
``digits_prepared``: their alignment on 800 examples (no REPAIR statistics). The align, stats,
merge, metrics and study tests share them instead of training, discovering and aligning again.
Tests that change a model or a preparation work on a copy.
``wheel``: the wheel built from (a copy of) this repository, as a user would install it.
``wheel_demo``: the README's ``graphrepair demo``, run once from an empty folder in a subprocess that
sees the wheel's packages and the installed dependencies and nothing of the repository (the
packaging test and the README test both read it).
torchvision's PyPI wheels are CUDA builds; next to the CPU torch of this project's machines its
compiled ops do not load and ``import torchvision`` fails, and so does every import of transformers
(which imports torchvision whenever it is installed). ``import_torchvision`` defines the missing
operator schemas first (a no-op where torchvision loads by itself); nothing happens when torchvision
is not installed.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.torchvision_compat import import_torchvision

try:
    import_torchvision()
except ImportError:
    pass

ROOT = Path(__file__).resolve().parents[1]

# Not part of a source tree: build products, environments, caches and what the README's commands
# write into the repository root.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".hypothesis", "out", "graphrepair-demo")


@pytest.fixture(scope="session")
def digits_pair():
    """((model A, model B), x, y): the digits MLPs (in eval mode) and their training split."""
    import torch

    from fixtures.datasets import digits
    from fixtures.train import train
    from fixtures.zoo import mlp

    x, y = digits("train")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = mlp(depth=3, width=32, in_features=64, classes=10)
        train(m, x, y, epochs=8, batch_size=64, lr=0.05, seed=seed)
        models.append(m.eval())
    return models, x, y


@pytest.fixture(scope="session")
def digits_spec(digits_pair):
    """The digits MLPs' PermutationSpec (``gr.discover(a, x[:2])``)."""
    import graphrepair as gr

    (a, _), x, _ = digits_pair
    return gr.discover(a, x[:2])


@pytest.fixture(scope="session")
def digits_prepared(digits_pair, digits_spec):
    """``prepare([a, b], x, num_examples=800, statistics=False)``: B aligned onto A by activation
    matching, with the permuted weights; read only (merge_prepared does not change it)."""
    from graphrepair.merging.merge import prepare

    (a, b), x, _ = digits_pair
    return prepare([a, b], x, num_examples=800, statistics=False, spec=digits_spec)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` of a copy of the repository (setuptools writes
    build/ and *.egg-info into the tree it builds, and stale files in build/ end up in the wheel)."""
    src = tmp_path_factory.mktemp("src") / "graphrepair"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE, symlinks=True)
    dist = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "-q", "-w", str(dist), str(src)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    (built,) = dist.glob("graphrepair-*.whl")
    return built


@pytest.fixture(scope="session")
def wheel_site(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked: what ``pip install`` puts into site-packages (it is a pure wheel)."""
    target = tmp_path_factory.mktemp("wheel_site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


@dataclass
class WheelRun:
    args: list[str]  # the command line after "graphrepair"
    cwd: Path  # the folder it ran in, empty before
    result: subprocess.CompletedProcess
    probe: dict  # sys.path, where graphrepair and passes came from, whether fixtures was found/imported


def run_wheel_console_script(wheel_site: Path, args: list[str], cwd: Path) -> WheelRun:
    """``graphrepair ARGS`` as the console script of an installed wheel, from ``cwd``.

    ``python -I -S``: no PYTHONPATH, no working directory on the path, no user site, and no .pth files
    (an editable install of this repository adds the repository through one); the import path is
    the wheel's folder and the interpreter's site-packages, nothing else. The entry point is read
    from the wheel's metadata and called the way pip's generated script calls it. A probe file
    records the import path, where the packages came from, whether ``fixtures`` was importable or
    imported by the end of the run and, for ``demo``, the run's ``DemoResult.as_dict()`` (recorded
    by wrapping ``graphrepair.demo.run_demo``), so tests can check its numbers without a second run.
    """
    (entry,) = [line for line in _dist_info(wheel_site, "entry_points.txt").splitlines()
                if line.replace(" ", "").startswith("graphrepair=")]
    module, _, func = entry.split("=", 1)[1].strip().partition(":")
    probe = cwd.parent / f"{cwd.name}.probe.json"
    path = [str(wheel_site), *site.getsitepackages()]
    code = f"""
import atexit, importlib.util, json, sys
sys.path[:0] = {path!r}
probe = {{"path": list(sys.path)}}
spec = importlib.util.find_spec("fixtures")
probe["fixtures_found"] = None if spec is None else str(spec.origin)
import graphrepair, passes
probe["graphrepair"], probe["passes"] = graphrepair.__file__, passes.__file__
import graphrepair.demo as demo
run_demo = demo.run_demo
def recording_run_demo(*args, **kwargs):
    result = run_demo(*args, **kwargs)
    probe["demo"] = result.as_dict()
    return result
demo.run_demo = recording_run_demo
def _done():
    probe["fixtures_imported"] = sorted(m for m in sys.modules if m == "fixtures" or m.startswith("fixtures."))
    with open({str(probe)!r}, "w") as fh:
        json.dump(probe, fh)
atexit.register(_done)
sys.argv[0] = "graphrepair"
from {module} import {func}
sys.exit({func}())
"""
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code, *args], cwd=cwd,
                            capture_output=True, text=True)
    data = json.loads(probe.read_text()) if probe.exists() else {}
    return WheelRun(args, cwd, result, data)


def _dist_info(wheel_site: Path, name: str) -> str:
    (info,) = wheel_site.glob("graphrepair-*.dist-info")
    return (info / name).read_text()


@pytest.fixture(scope="session")
def wheel_demo(wheel_site, tmp_path_factory) -> WheelRun:
    """The README's ``graphrepair demo`` (default options, text output) from an empty folder, with
    only the wheel installed: the one demo run that the README and packaging tests share."""
    cwd = tmp_path_factory.mktemp("anywhere")
    return run_wheel_console_script(wheel_site, ["demo"], cwd)
