"""The demo's data: scikit-learn's 8x8 digits, bundled with scikit-learn, so nothing is downloaded.

1,797 images split 1,437 / 360 by a fixed stratified shuffle, normalised with the training split's
mean and std. The raw arrays are cached in memory; every call returns fresh tensors, so callers may
modify them. (``fixtures.datasets`` adds MNIST for the tests and re-exports ``digits``.)
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from graphrepair.errors import DataError

__all__ = ["SPLITS", "check_split", "digits"]

SPLITS = ("train", "test")


def check_split(split: str) -> None:
    """DataError unless ``split`` is "train" or "test"."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")


@functools.lru_cache(maxsize=1)
def _digits_raw() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    mean, std = float(x_train.mean()), float(x_train.std())
    return {"train": ((x_train - mean) / std, y_train), "test": ((x_test - mean) / std, y_test)}


def digits(split: str = "train", flatten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(x, y)``: x float32 (N, 1, 8, 8) (or (N, 64)), normalised; y int64.

    N is 1,437 for ``"train"`` and 360 for ``"test"`` (a fixed stratified split).
    """
    check_split(split)
    x_np, y_np = _digits_raw()[split]
    x = torch.from_numpy(x_np.astype(np.float32, copy=True))
    x = x if flatten else x.reshape(-1, 1, 8, 8)
    return x, torch.from_numpy(y_np.copy())
