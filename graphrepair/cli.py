"""The ``graphrepair`` command line.

Every command turns a GraphRepairError (bad input: a file, a shape, a model reference) into one
line on stderr and exit status 2; ``--debug`` shows the traceback instead. Output files are
written atomically, so a failed command leaves no partial file.
"""

from __future__ import annotations

import functools
import json
import sys

import click
import torch

from .errors import GraphRepairError

EXIT_BAD_INPUT = 2


class _State:
    debug = False
    quiet = False
    device = "auto"


STATE = _State()


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"graphrepair: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Bad input -> one line and exit 2; unexpected errors -> one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GraphRepairError as e:
            if STATE.debug:
                raise
            _fail(" ".join(str(e).split()))
        except BrokenPipeError:  # output piped into head & co.
            sys.stderr.close()
            sys.exit(0)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug, not bad input: still one line unless --debug
            if STATE.debug:
                raise
            first = " ".join(str(e).split())[:500]
            _fail(f"internal error ({type(e).__name__}: {first}); rerun with --debug for the "
                  f"traceback and please report it", 1)

    return wrapper


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise GraphRepairError(f"--input-shape {text!r} is not a comma-separated list of integers "
                               f"(e.g. 1,3,32,32)") from None
    if not shape or any(s <= 0 for s in shape):
        raise GraphRepairError(f"--input-shape {text!r} must list positive sizes (e.g. 1,3,32,32)")
    return shape


def example_input(shape: tuple[int, ...], dtype: str, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == "long":
        return torch.randint(0, vocab, shape, generator=gen)
    return torch.randn(shape, generator=gen)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GraphRepairError("--device cuda was requested but torch sees no CUDA device; "
                               "use --device cpu or auto")
    return torch.device(name)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where models run.")
@click.version_option(package_name="graphrepair")
def main(debug: bool, quiet: bool, device: str) -> None:
    """Discover permutation symmetries of PyTorch models, merge models with REPAIR, export ONNX."""
    STATE.debug, STATE.quiet, STATE.device = debug, quiet, device


_model_option = click.option("--model", "model_ref", required=True, metavar="MODULE:FACTORY",
                             help="Zero-argument callable returning the nn.Module "
                                  "(e.g. fixtures.zoo:resnet20_bn).")
_shape_option = click.option("--input-shape", required=True, metavar="N,C,H,W",
                             help="Example input shape, batch first (e.g. 1,3,32,32).")
_dtype_option = click.option("--input-dtype", type=click.Choice(["float", "long"]), default="float",
                             show_default=True, help="long for token ids.")
_vocab_option = click.option("--vocab", type=int, default=2, show_default=True,
                             help="Token ids are drawn from [0, vocab) for --input-dtype long.")


@main.command()
@_model_option
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help=".safetensors or .pt/.pth state dict.")
@_shape_option
@_dtype_option
@_vocab_option
@click.option("--json", "as_json", is_flag=True, help="Print the spec as JSON.")
@click.option("--dot", "dot_path", type=click.Path(dir_okay=False), default=None,
              help="Write the traced graph, coloured by group, as Graphviz DOT.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Prove the spec: random permutations of every group must keep the outputs.")
@handle_errors
def inspect(model_ref, checkpoint, input_shape, input_dtype, vocab, as_json, dot_path, check):
    """Show a model's permutation groups and the axes kept fixed, with reasons."""
    from .discover import discover
    from .fileio import atomic_write
    from .loading import load_model
    from .report import print_spec, spec_to_dict, spec_to_dot

    model = load_model(model_ref, checkpoint)
    x = example_input(parse_shape(input_shape), input_dtype, vocab)
    spec = discover(model, (x,))
    max_diff = spec.check(model, (x,)) if check else None
    if dot_path:
        dot = spec_to_dot(spec)
        atomic_write(dot_path, lambda p: p.write_text(dot))
    if as_json:
        data = spec_to_dict(spec)
        data["check_max_abs_diff"] = max_diff
        click.echo(json.dumps(data, indent=2))
        return
    print_spec(spec)
    if max_diff is not None:
        click.echo(f"check: random permutations of all {len(spec.groups)} groups keep the outputs "
                   f"(max abs diff {max_diff:.2e})")
    if dot_path:
        click.echo(f"wrote {dot_path}")


if __name__ == "__main__":  # pragma: no cover
    main()
