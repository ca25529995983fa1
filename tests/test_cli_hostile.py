"""Hostile input against the command line, in-process (click's CliRunner): the README's promise is
kept on every case -- exit status 2 (130 and 128 + n for interrupts) and exactly one line on
stderr, no traceback, no partial file, every input and every pre-existing output unchanged -- or,
where the input is odd but fine, exit 0 with valid outputs.

``CASES`` is the table of bad inputs, one row per way a hostile user tried to break a run (the
issue "Hostile input": outputs naming inputs, bad batches later in the stream, bad labels, models
that cannot be merged, malformed options, unreadable paths...). The tests after it cover what does
not fit a row: outputs that must come out right (symlinks, modes, long names), a full disk, an
interrupt in the exporter and between two renames. Real signals and real processes:
``test_cli_signals.py``; random inputs: ``test_cli_property.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from graphrepair.cli import main
from tests import hostile_models

ROOT = Path(__file__).resolve().parents[1]
M = "tests.hostile_models"
OLD = b"old output, must survive"


def save(state: dict, path: Path) -> None:
    from graphrepair.io.fileio import save_safetensors

    save_safetensors(state, path)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Inputs: checkpoints of every hostile model (seeds 0 and 1), digits data and broken files."""
    d = tmp_path_factory.mktemp("hostile")
    hostile_models.write_inputs(d)
    xt, yt = np.load(d / "test.npz")["x"], np.load(d / "test.npz")["y"]
    x = np.load(d / "fit.npz")["x"]
    np.savez(d / "onehot.npz", x=xt, y=np.eye(10, dtype=np.float32)[yt])
    np.savez(d / "onehot_int.npz", x=xt, y=np.eye(10, dtype=np.int64)[yt])
    np.savez(d / "one.npz", x=x[:1])
    np.savez(d / "zeros.npz", x=np.zeros_like(x))
    state = hostile_models.MLP().state_dict()
    state["a.weight"][3, 5] = float("nan")
    save(state, d / "nan_a.safetensors")
    torch.save({k: v.to(torch.complex64) for k, v in hostile_models.MLP().state_dict().items()}, d / "complex_a.pt")
    bn = {k: v for k, v in hostile_models.ConvBN().state_dict().items() if not k.endswith("num_batches_tracked")}
    save(bn, d / "bn_old.safetensors")
    os.mkfifo(d / "fifo.safetensors")
    os.mkfifo(d / "fifo.npz")
    (d / "sub").mkdir()
    shutil.copy(ROOT / "tests" / "hostile_models.py", d / "models_copy.py")
    return d


@pytest.fixture(autouse=True)
def data_env(work, monkeypatch):
    monkeypatch.setenv("GRAPHREPAIR_TEST_DATA", str(work / "functions.npz"))


def invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def snapshot(*folders: Path) -> dict:
    """Every entry (hidden ones too): kind, mode and, for regular files, a hash of the contents."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            st = p.lstat()
            digest = hashlib.sha1(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else os.readlink(p) \
                if stat.S_ISLNK(st.st_mode) else ""
            out[str(p)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return out


def one_line(result, code: int = 2) -> str:
    """The promise on a failed run; returns the line."""
    assert result.exit_code == code, (result.exit_code, result.stdout[-500:], result.stderr[-2000:])
    err = result.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("graphrepair: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# The table

MERGE = {"--model": f"{M}:mlp", "--a": "{w}/mlp_a.safetensors", "--b": "{w}/mlp_b.safetensors",
         "--data": "{w}/fit.npz", "--out": "{t}/merged.onnx"}
EXPORT = {"--model": f"{M}:mlp", "--checkpoint": "{w}/mlp_a.safetensors", "--input-shape": "2,64",
          "--out": "{t}/merged.onnx"}
INSPECT = {"--model": f"{M}:mlp", "--input-shape": "2,64"}
BARRIER = {**MERGE, "--eval": "{w}/test.npz", "--out": None}


def pair(name: str) -> dict:
    return {"--model": f"{M}:{name}", "--a": f"{{w}}/{name}_a.safetensors", "--b": f"{{w}}/{name}_b.safetensors"}


@dataclass
class Case:
    command: str
    options: dict
    phrases: tuple = ()
    absent: tuple = ()  # phrases the line must not contain
    pre: tuple = ()  # global options
    setup: object = None  # fn(work, tmp) run first
    skip: str | None = None

    def argv(self, w: Path, t: Path) -> list[str]:
        base = {"merge": MERGE, "export": EXPORT, "inspect": INSPECT, "barrier": BARRIER}.get(self.command, {})
        opts = {**base, **self.options}
        args = [*self.pre, self.command]
        for key, value in opts.items():
            if value is None:
                continue
            args += [key] if value is True else [key, str(value).format(w=w, t=t)]
        return args


def merge(phrases=(), *, absent=(), pre=(), setup=None, skip=None, **options) -> Case:
    return Case("merge", _opts(options), tuple(phrases), tuple(absent), tuple(pre), setup, skip)


def _opts(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        out.update(v if k == "opts" else {"--" + k.rstrip("_").replace("_", "-"): v})
    return out


def command(name, phrases=(), *, pre=(), setup=None, skip=None, **options) -> Case:
    return Case(name, _opts(options), tuple(phrases), (), tuple(pre), setup, skip)


def symlink(link: str, target: str):
    def make(w: Path, t: Path) -> None:
        (t / link).symlink_to(str(target).format(w=w, t=t))
    return make


def hardlink(link: str, target: str):
    def make(w: Path, t: Path) -> None:
        os.link(str(target).format(w=w, t=t), t / link)
    return make


LONG = "n" * 256
DEEP = "d/" * 2100
NO_GPU = "CUDA is present" if torch.cuda.is_available() else None

CASES = {
    # 1. an output that names an input is refused before any work (the input would be destroyed)
    "out is --a": merge(["--out", "is the input --a"], out="{w}/mlp_a.safetensors"),
    "out is --a, spelt otherwise": merge(["--out", "is the input --a"], out="{w}/sub/../mlp_a.safetensors"),
    "weights is --a through a symlink": merge(["--weights", "is the input --a"], no_onnx=True,
                                              weights="{t}/link.safetensors",
                                              setup=symlink("link.safetensors", "{w}/mlp_a.safetensors")),
    "weights is --b through a hard link": merge(["--weights", "is the input --b"], weights="{t}/hard.safetensors",
                                                setup=hardlink("hard.safetensors", "{w}/mlp_b.safetensors")),
    "out is --data": merge(["--out", "is the input --data"], out="{w}/fit.npz"),
    "out is --eval": merge(["--out", "is the input --eval"], eval_="{w}/test.npz", out="{w}/test.npz"),
    "out is the model's file": merge(["--out", "is the input --model"], model="{w}/models_copy.py:mlp",
                                     out="{w}/models_copy.py"),
    "export out is --checkpoint": command("export", ["--out", "is the input --checkpoint"],
                                          out="{w}/mlp_a.safetensors"),
    "inspect dot is --checkpoint": command("inspect", ["--dot", "is the input --checkpoint"],
                                           checkpoint="{w}/mlp_a.safetensors", dot="{w}/mlp_a.safetensors"),
    "barrier plot links to --a": command("barrier", ["--plot", "is the input --a"], plot="{t}/p.png",
                                         setup=symlink("p.png", "{w}/mlp_a.safetensors")),
    "out is /dev/null": merge(["--out", "character device"], out="/dev/null"),
    # 5. what ended in "internal error" (exit 1) is bad input
    "one-hot float labels": merge(["--eval", "one-hot", "argmax"], eval_="{w}/onehot.npz"),
    "one-hot integer labels": merge(["--eval", "one-hot"], eval_="{w}/onehot_int.npz"),
    "later batch of another shape": merge(["--data", "batch 2", "(32,)", "expected (64,)"], data=f"{M}:later_shape"),
    "later batch of another dtype": merge(["--data", "batch 1", "float64"], data=f"{M}:later_dtype"),
    "later batch with NaN": merge(["--data", "batch 2", "NaN"], data=f"{M}:later_nan"),
    "later label out of range": merge(["--eval", "batch 2", "[0, 10]", "10 outputs"],
                                      eval_=f"{M}:later_label_out_of_range"),
    "later labels of float dtype": merge(["--eval", "batch 2", "float32"], eval_=f"{M}:later_label_float"),
    "data generator raises midway": merge(["--data", "batch 3", "ValueError", "went away"],
                                          data=f"{M}:raising_midway"),
    "(x, y) of different lengths": merge(["--eval", "differ in length", "300", "295"], eval_=f"{M}:xy_lengths"),
    "dict output without logits": merge(["--eval", "without 'logits'", "scores"], opts=pair("dict_out"),
                                        eval_="{w}/test.npz"),
    "model with a fixed batch size": merge(["--data", "batch of", "fix its batch size"], opts=pair("fixed_batch")),
    "export of a fixed batch size": command("export", ["--input-shape", "fix its batch size"],
                                            model=f"{M}:fixed_batch", checkpoint="{w}/fixed_batch_a.safetensors"),
    "huge --input-shape": command("export", ["--input-shape", "elements"], input_shape="100000,100000,1000"),
    "absurd --input-shape": command("inspect", ["--input-shape", "elements"], input_shape="9" * 30),
    "--vocab 0": command("inspect", ["--vocab 0", "positive"], input_dtype="long", vocab="0"),
    "--vocab negative": command("export", ["--vocab -3", "positive"], input_dtype="long", vocab="-3"),
    "file name over 255 bytes (--out)": merge(["--out", "bytes long", "at most 255"], out="{t}/" + LONG + ".onnx"),
    "file name over 255 bytes (--a)": merge(["--a", "bytes long"], a="{w}/" + LONG + ".safetensors"),
    "path over 4 KB (--weights)": merge(["--weights", "bytes long"], weights="{t}/" + DEEP + "w.safetensors"),
    "path over 4 KB (--data)": merge(["--data", "bytes long"], data="{w}/" + DEEP + "fit.npz"),
    # 6. one line, not three (click's usage errors) nor torch's warnings and graph dumps
    "--alpha abc": merge(["--alpha", "not a valid float"], alpha="abc"),
    "--repair bogus": merge(["--repair", "bogus"], repair="bogus"),
    "--method bogus": merge(["--method", "bogus"], method="bogus"),
    "--num-examples 1.5": merge(["--num-examples", "1.5"], num_examples="1.5"),
    "--device tpu": merge(["--device", "tpu"], pre=("--device", "tpu")),
    "missing --a": merge(["Missing option", "--a"], a=None),
    "no such command": command("mrege", ["No such command"]),
    "data function raises a BaseException": merge(["--data", "Stop", "no data today"], data=f"{M}:base_exception"),
    "data generator raises a BaseException": merge(["--data", "batch 1", "Stop"], data=f"{M}:base_exception_midway"),
    # 7. the line says the right thing
    "no groups: in-place op": merge(["no permutation groups", "graphrepair inspect", "cumsum_"], opts=pair("in_place")),
    "no groups: hidden features returned": merge(["no permutation groups", "graphrepair inspect"],
                                                 opts=pair("hidden_out")),
    "no groups: buffers only": merge(["no permutation groups"], opts=pair("buffers_only")),
    "nothing to reset: einsum layers": merge(["nothing to repair in Einsum", "--repair none"], opts=pair("einsum")),
    "non-UTF-8 --out": merge(["--out", "UTF-8"], out=os.fsdecode(b"{t}/m\xff.onnx")),
    # the GraphModule asked for (the default gives the class back, leaving those resets out)
    "tied weights with --points conv": merge(["--weights", "drop --output graph", "--repair reset or none"],
                                             absent=["use --points conv"], opts=pair("tied_square"), points="conv",
                                             weights="{t}/w.safetensors", output="graph"),
    # 8. bad input that was accepted
    "complex checkpoint": merge(["--a", "complex", "imaginary"], a="{w}/complex_a.pt"),
    "inspect --device cuda without a GPU": command("inspect", ["--device cuda", "no CUDA device"],
                                                   pre=("--device", "cuda"), skip=NO_GPU),
    "--input-shape 1,,64": command("export", ["--input-shape", "'1,,64'"], input_shape="1,,64"),
    "export of NaN weights": command("export", ["NaN", "a.weight"], checkpoint="{w}/nan_a.safetensors"),
    "merge of NaN weights": merge(["NaN", "a.weight"], a="{w}/nan_a.safetensors"),
    # 10. degenerate input
    "one example": merge(["--data", "1 example"], data="{w}/one.npz"),
    "all-zero data": merge(["--data", "identical"], data="{w}/zeros.npz"),
    "--num-examples 1": merge(["1 example", "--num-examples"], num_examples="1"),
    "--alphas 100000000": command("barrier", ["--alphas", "at most 101"], alphas="100000000"),
    "FIFO as --checkpoint": merge(["--a", "FIFO"], a="{w}/fifo.safetensors"),
    "FIFO as --data": merge(["--data", "FIFO"], data="{w}/fifo.npz"),
    "FIFO as --eval": merge(["--eval", "FIFO"], eval_="{w}/fifo.npz"),
    # 11. models and data as users may hold them, refused before anything runs them
    "TorchScript factory (merge)": merge(["--model", "TorchScript module", "use the nn.Module it was made from"],
                                         model=f"{M}:scripted"),
    "TorchScript factory (export)": command("export", ["--model", "TorchScript module"], model=f"{M}:scripted"),
    "data on the meta device": merge(["--data", "meta device", "a shape without values"], data=f"{M}:meta_data"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input(work, tmp_path, case):
    c = CASES[case]
    if c.skip:
        pytest.skip(c.skip)
    (tmp_path / "merged.onnx").write_bytes(OLD)  # a pre-existing output: must survive
    if c.setup is not None:
        c.setup(work, tmp_path)
    before = snapshot(work, tmp_path)
    line = one_line(invoke(c.argv(work, tmp_path)))
    for phrase in c.phrases:
        assert phrase in line, (phrase, line)
    for phrase in c.absent:
        assert phrase not in line, (phrase, line)
    assert snapshot(work, tmp_path) == before
    assert Path("/dev/null").is_char_device()


# ------------------------------------------------------------------------------------------------
# Odd but fine: the outputs come out right


def test_symlink_mode_long_name_and_few_examples(work, tmp_path):
    """--out is a symlink to an existing 0600 file: the file it points to is replaced, the link
    stays and the mode is kept; --weights has a 250-byte name; 20 examples for groups of 32
    channels merge with a warning."""
    real = tmp_path / "real.onnx"
    real.write_bytes(OLD)
    real.chmod(0o600)
    (tmp_path / "link.onnx").symlink_to(real)
    weights = tmp_path / ("w" * 238 + ".safetensors")
    assert len(weights.name.encode()) == 250
    result = invoke(["-q", "merge", *Case("merge", {}).argv(work, tmp_path)[1:-2], "--out", tmp_path / "link.onnx",
                     "--weights", weights, "--num-examples", "20", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (tmp_path / "link.onnx").is_symlink() and os.readlink(tmp_path / "link.onnx") == str(real)
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    import onnx
    onnx.checker.check_model(onnx.load(str(real)))
    from safetensors.torch import load_file
    assert set(load_file(str(weights))) == set(hostile_models.MLP().state_dict())
    assert report["examples"] == 20 and any("only 20 examples" in w for w in report["warnings"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["real.onnx", "link.onnx", weights.name])


def test_batchnorm_checkpoint_without_num_batches_tracked(work):
    result = invoke(["inspect", "--model", f"{M}:conv_bn", "--checkpoint", work / "bn_old.safetensors",
                     "--input-shape", "2,64", "--no-check", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["totals"]["free_channels"] == 8


def test_readme_model_reference_file_and_one_shot_data(work, tmp_path):
    """A model given as a file and data given as a one-shot generator merge (weights only)."""
    result = invoke(["-q", "merge", "--model", f"{work / 'models_copy.py'}:mlp", "--a", work / "mlp_a.safetensors",
                     "--b", work / "mlp_b.safetensors", "--data", f"{M}:batches", "--repair", "none",
                     "--no-onnx", "--weights", tmp_path / "w.safetensors"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "w.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# A full disk


@pytest.mark.parametrize("target", ["--weights", "--out"])
def test_full_disk(work, tmp_path, target):
    """A file size limit (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk) while writing an
    output: one line naming the output the user gave (not a temporary file), no dynamic_batch hint,
    nothing left behind."""
    (tmp_path / "merged.onnx").write_bytes(OLD)
    args = ["merge", *Case("merge", {}).argv(work, tmp_path)[1:-2], "--repair", "none", "--num-examples", "100"]
    args += (["--no-onnx", "--weights", tmp_path / "w.safetensors"] if target == "--weights"
             else ["--out", tmp_path / "merged.onnx"])
    before = snapshot(work, tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
    try:
        result = invoke(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    line = one_line(result)
    name = "w.safetensors" if target == "--weights" else "merged.onnx"
    assert f"cannot write '{tmp_path / name}'" in line and "File too large" in line, line
    assert "tmp" not in line.replace(str(tmp_path), "") and "dynamic_batch" not in line
    assert snapshot(work, tmp_path) == before


# ------------------------------------------------------------------------------------------------
# Interrupts where only a patch can put them


def test_interrupt_turned_into_an_export_error_is_an_interrupt(work, tmp_path, monkeypatch):
    """torch's exporter turned Ctrl-C into an AttributeError, reported as bad input (exit 2)."""
    import torch.onnx

    def export(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("'NoneType' object has no attribute 'graph'")  # noqa: B904

    monkeypatch.setattr(torch.onnx, "export", export)
    (tmp_path / "merged.onnx").write_bytes(OLD)
    before = snapshot(work, tmp_path)
    line = one_line(invoke(["merge", *Case("merge", {}).argv(work, tmp_path)[1:], "--repair", "none",
                            "--num-examples", "100"]), code=130)
    assert "interrupted" in line and "no output was written" in line and "dynamic_batch" not in line
    assert snapshot(work, tmp_path) == before


def test_interrupt_a_library_swallowed_commits_nothing(work, tmp_path, monkeypatch):
    """Ctrl-C while a library catches every exception (an import's or a ``__del__``'s handler): the
    run goes on to its end, but its outputs are not committed, and the line says none was written
    (the real-process test of a signal while torch is imported once found both files replaced)."""
    import torch.onnx

    real_export = torch.onnx.export

    def export(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: B036 -- what the library does
            pass
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    out, weights = tmp_path / "merged.onnx", tmp_path / "w.safetensors"
    out.write_bytes(OLD)
    weights.write_bytes(OLD)
    before = snapshot(work, tmp_path)
    result = invoke(["merge", *Case("merge", {}).argv(work, tmp_path)[1:-2], "--repair", "none",
                     "--num-examples", "100", "--out", out, "--weights", weights])
    line = one_line(result, code=130)
    assert "interrupted" in line and "no output was written" in line, line
    assert snapshot(work, tmp_path) == before


def test_sigterm_between_two_renames_commits_both(work, tmp_path, monkeypatch):
    """SIGTERM right after --out is renamed into place (the issue's run said "interrupted" while
    --weights was still the old file): the signal waits for the other rename, and the line says
    every output was written."""
    from graphrepair.io import fileio

    out, weights = tmp_path / "merged.onnx", tmp_path / "w.safetensors"
    out.write_bytes(OLD)
    weights.write_bytes(OLD)
    real_commit = fileio.Staged.commit
    sent = []

    def commit(self):
        real_commit(self)
        if self.path in (out, weights) and not sent:  # not the writers' own temporary files
            sent.append(self.path)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(fileio.Staged, "commit", commit)
    result = invoke(["merge", *Case("merge", {}).argv(work, tmp_path)[1:-2], "--repair", "none",
                     "--num-examples", "100", "--out", out, "--weights", weights])
    line = one_line(result, code=128 + signal.SIGTERM)
    assert "interrupted (SIGTERM) after every output was written" in line, line
    assert out.read_bytes() != OLD and weights.read_bytes() != OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.onnx", "w.safetensors"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone


def test_failed_rename_restores_every_output(tmp_path, monkeypatch):
    """The second rename fails: the first output gets its old file back."""
    from graphrepair.errors import OutputError
    from graphrepair.io import fileio
    from graphrepair.io.fileio import atomic_outputs

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"old a")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == b:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OutputError, match="no output was changed"):
        with atomic_outputs([a, b]) as (ta, tb):
            ta.write_bytes(b"new a")
            tb.write_bytes(b"new b")
    assert a.read_bytes() == b"old a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_outputs_not_committed_once_a_signal_came(tmp_path):
    """``atomic_outputs(interrupted=...)`` asks after the writers: a signal already received means
    no rename, every temporary file removed, and a KeyboardInterrupt; no signal, both committed."""
    from graphrepair.io.fileio import atomic_outputs

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"old a")
    with pytest.raises(KeyboardInterrupt, match="SIGINT arrived before the outputs were committed"):
        with atomic_outputs([a, b], interrupted=lambda: signal.SIGINT) as (ta, tb):
            ta.write_bytes(b"new a")
            tb.write_bytes(b"new b")
    assert a.read_bytes() == b"old a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    written = []
    with atomic_outputs([a, b], written, interrupted=lambda: None) as (ta, tb):
        ta.write_bytes(b"new a")
        tb.write_bytes(b"new b")
    assert (a.read_bytes(), b.read_bytes(), written) == (b"new a", b"new b", [a, b])
