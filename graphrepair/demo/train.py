"""A plain, quick, deterministic training loop (the demo's; the test fixtures train with it too).

``train`` runs mini-batch SGD with Nesterov momentum (or Adam) under a one-cycle schedule: the
learning rate rises linearly from ``lr / 25`` to ``lr`` over the first ``warmup`` fraction of the
steps, then falls linearly to zero. Cross-entropy loss, optionally with label smoothing; weight decay
is applied to weights (dim > 1) only, not to biases or normalisation parameters.

Determinism: the data order comes from a ``torch.Generator`` seeded with ``seed``, and the global RNG
(dropout and the like) is seeded inside ``torch.random.fork_rng``, so the caller's random state is
left untouched. On CPU with the same torch build and thread count the result is bit-for-bit
reproducible; on CUDA up to the nondeterminism of its kernels.

``train_pair`` builds two models from different seeds (different initialisations and data orders):
the independently trained networks graphrepair aligns and merges.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from graphrepair.errors import DataError, GraphRepairError, NumericError
from passes.modules import module_device

__all__ = ["evaluate", "train", "train_pair"]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNGs for the block; restore the caller's state afterwards."""
    # Only the generators used here are seeded and restored: torch.manual_seed would also (lazily)
    # reseed every CUDA device, outside fork_rng's protection.
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        if cuda_devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op CPU threads for the block (process-wide while it runs)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _one_cycle(step: int, total: int, warmup: float) -> float:
    """Learning-rate factor at ``step`` of ``total``: linear 1/25 -> 1 over ``warmup``, then linear -> 0."""
    peak = max(1, round(warmup * total))
    if step < peak:
        return 1 / 25 + (1 - 1 / 25) * step / peak
    return max(0.0, (total - step) / max(1, total - peak))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    warmup: float = 0.15,
    threads: int | None = 1,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place on ``(x, y)`` (class indices) and return it in eval mode.

    ``device``: where to train (the model is moved there); default the model's device. The whole
    dataset is moved there once. ``optimizer``: ``"sgd"`` (Nesterov momentum) or ``"adam"``
    (AdamW-style decoupled weight decay). ``progress`` prints one line per epoch to stderr.
    ``threads``: torch's CPU threads while training, restored afterwards (``None`` keeps the current
    setting). One by default: the small fixture models gain little from intra-op parallelism and
    lose badly when the cores are shared -- on a busy 2-core machine an MNIST MLP epoch took 1.3 s
    with one thread and 12 to 21 s with two.
    Raises NumericError if the loss becomes NaN or infinite (lower ``lr``).
    """
    if optimizer not in ("sgd", "adam"):
        raise GraphRepairError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if epochs < 1 or batch_size < 1:
        raise GraphRepairError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    device = torch.device(device) if device is not None else module_device(model)
    model.to(device)
    x = x.to(device)
    y = y.to(device)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch

    groups = _param_groups(model, weight_decay)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=lr)
    order = torch.Generator().manual_seed(seed)

    model.train()
    step = 0
    with _seeded(seed, device), _cpu_threads(threads):
        for epoch in range(epochs):
            start = time.perf_counter()
            perm = torch.randperm(n, generator=order).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for i in range(steps_per_epoch):
                index = perm[i * batch_size : (i + 1) * batch_size]
                xb, yb = x[index], y[index]
                for group in opt.param_groups:
                    group["lr"] = lr * _one_cycle(step, total, warmup)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.detach() * len(index)
                correct += (logits.detach().argmax(1) == yb).sum()
            mean_loss = loss_sum.item() / n
            if not math.isfinite(mean_loss):
                raise NumericError(
                    f"training loss became {mean_loss} in epoch {epoch + 1}; lower the learning rate (lr={lr})"
                )
            if progress:
                print(
                    f"epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f}, train accuracy "
                    f"{correct.item() / n:.4f}, {time.perf_counter() - start:.1f}s",
                    file=sys.stderr,
                )
    return model.eval()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``(x, y)``, in eval mode, on the model's device:
    the library's ``graphrepair.study.metrics.evaluate`` on the arrays. The model's train/eval mode is
    restored afterwards."""
    from graphrepair.study.metrics import evaluate as evaluate_data

    return evaluate_data(model, (x, y), batch_size=batch_size)


def train_pair(
    factory: Callable[[], nn.Module],
    dataset: tuple[torch.Tensor, torch.Tensor],
    seeds: tuple[int, int] = (0, 1),
    **kw,
) -> tuple[nn.Module, nn.Module]:
    """Two models from ``factory`` trained on ``dataset = (x, y)`` with ``train(**kw)``.

    Model i is initialised with the global RNG seeded by ``seeds[i]`` (inside ``fork_rng``, so the
    caller's RNG state is untouched) and trained with ``seed=seeds[i]``: different initialisations
    and different data orders, reproducible. ``kw`` must include ``epochs`` and ``lr``.
    """
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise GraphRepairError(f"train_pair needs two different seeds, got {seeds!r}")
    if "seed" in kw:
        raise GraphRepairError("train_pair sets seed from seeds; do not pass seed")
    x, y = dataset
    device = torch.device(kw["device"]) if kw.get("device") is not None else torch.device("cpu")
    models = []
    for seed in seeds:
        with _seeded(seed, device):
            model = factory()
        models.append(train(model, x, y, seed=seed, **kw))
    return models[0], models[1]
