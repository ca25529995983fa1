"""Options shared by several commands, and the checks of their values.

click checks the types (``--alpha abc`` is a usage error, one line); these check the values, each
raising a GraphRepairError led by the option's name. Nothing here imports torch at module level:
the command line must answer Ctrl-C from its first second, so heavy imports happen inside the
commands, under the signal handlers.
"""

from __future__ import annotations

import math
import re

import click

from graphrepair.errors import DataError, ShapeError

MAX_ALPHAS = 101  # a barrier curve costs one merge and one evaluation per point
MAX_INPUT_ELEMENTS = 2 ** 28  # an example input of 1 GiB in float32 is not an example

model_option = click.option("--model", "model_ref", required=True, metavar="MODULE:FACTORY",
                            help="Zero-argument callable returning the nn.Module "
                                 "(e.g. fixtures.zoo:resnet20_bn); or hf:DIR (a save_pretrained folder, "
                                 "built from its config offline), torchvision:NAME, timm:NAME.")
shape_option = click.option("--input-shape", required=True, metavar="N,C,H,W",
                            help="Example input shape, batch first (e.g. 1,3,32,32).")
dtype_option = click.option("--input-dtype", type=click.Choice(["float", "long"]), default="float",
                            show_default=True, help="long for token ids.")
vocab_option = click.option("--vocab", type=int, default=2, show_default=True,
                            help="Token ids are drawn from [0, vocab) for --input-dtype long.")

pair_options = [
    click.option("--a", "ckpt_a", required=True, metavar="A", help="Checkpoint of model A (alpha 0)."),
    click.option("--b", "ckpt_b", required=True, metavar="B", help="Checkpoint of model B (alpha 1)."),
    click.option("--data", "fit_ref", required=True, metavar="FIT",
                 help="Fitting data for alignment and REPAIR statistics: .npz/.npy/.pt/.safetensors "
                      "with 'x', or MODULE:FUNCTION."),
    click.option("--method", type=click.Choice(["activation", "weight"]), default="activation",
                 show_default=True, help="Align by activation correlation or by weight matching."),
    click.option("--num-examples", type=int, default=5000, show_default=True,
                 help="Examples for the statistics passes."),
    click.option("--points", type=click.Choice(["all", "conv"]), default="all", show_default=True,
                 help="REPAIR reset points: every conv/linear and residual output, or conv/linear only "
                      "(always foldable into the weights)."),
]


def with_options(options):
    """Apply a list of click options, in order, as one decorator."""
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,32,32`` (or ``1x3x32x32``): positive sizes, none left out, not absurdly large."""
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    if not text.strip() or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ShapeError(f"--input-shape {text!r} is not a comma-separated list of integers "
                         f"(e.g. 1,3,32,32)")
    shape = tuple(int(p) for p in parts)
    if any(s <= 0 for s in shape):
        raise ShapeError(f"--input-shape {text!r} must list positive sizes (e.g. 1,3,32,32)")
    elements = math.prod(shape)
    if elements > MAX_INPUT_ELEMENTS:
        raise ShapeError(f"--input-shape {text!r} asks for {elements:.3g} elements, more than the "
                         f"{MAX_INPUT_ELEMENTS:,} an example input may have; give one small batch "
                         f"(e.g. 1,3,32,32)")
    return shape


def check_vocab(vocab: int) -> int:
    if vocab < 1:
        raise DataError(f"--vocab {vocab}: must be a positive number of token ids")
    return vocab


def positive(value: int, option: str) -> int:
    if value < 1:
        raise DataError(f"{option} must be a positive number, got {value}")
    return value


def sweeps(value: int, option: str) -> int:
    if value < 0:
        raise DataError(f"{option} must be a whole number of sweeps >= 0, got {value}")
    return value


def alpha_count(alphas: int) -> int:
    """--alphas: points on the path, ends included."""
    if alphas < 2:
        raise DataError(f"--alphas needs at least 2 points (the two endpoints), got {alphas}")
    if alphas > MAX_ALPHAS:
        raise DataError(f"--alphas {alphas}: at most {MAX_ALPHAS} points (each costs a merge and an "
                        f"evaluation); 11 draws the curve")
    return alphas


def repair_mode(repair: str) -> str | None:
    return None if repair == "none" else repair
