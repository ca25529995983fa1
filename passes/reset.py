"""REPAIR's reset node and the per-channel affine it becomes.

A reset sits on a tensor x with channel axis ``dim`` (1 for conv outputs, -1 for linear outputs)
and gives every channel c a chosen mean and standard deviation (REPAIR, Jordan et al. 2023: the
goal statistics of the interpolated network are the interpolated statistics of the endpoints,
goal_mean = (1-a) mu_A + a mu_B, goal_std = (1-a) sigma_A + a sigma_B):

    y_c = (x_c - m_c) / sqrt(v_c + eps) * goal_std_c + goal_mean_c

- "collect" mode: m, v are the statistics of the current batch over every axis but ``dim``
  (BatchNorm in train mode: for small float32/float64 tensors and on CUDA its fused kernel on x
  seen as (pre, C, post), which returns the batch's mean and inverse std with the output), and
  the reset accumulates the exact mean and population variance of x over every batch seen
  (``passes.moments.ChannelSums``: float64 sums, about a per-channel shift where means are large;
  a cumulative average, not BatchNorm's per-batch momentum=None average). ``running_mean`` /
  ``running_var`` hold them after each batch (written from the sums when next read: attribute,
  ``state_dict``, apply mode).
  ``set_batch_goal(mean, std)`` gives the next batches' outputs another (mean, std) than the goal
  (exact REPAIR's per-batch goals); what is collected does not change.
- "apply" mode: m, v = running_mean, running_var (BatchNorm in eval mode); the stats can also be
  set directly with ``set_running`` (closed-form REPAIR, no pass through the merged net).

In apply mode the reset is the per-channel affine map y = scale * x + shift with

    scale = goal_std / sqrt(running_var + eps),   shift = goal_mean - running_mean * scale

(``as_affine()``), which ``fold_affines`` folds into the op producing x, or keeps as a
``ChannelAffine`` when it cannot.

A scale-only reset (``scale_only=True``, for a producer with no bias to take a shift) corrects only
the spread, y_c = x_c / sqrt(v_c + eps) * goal_std_c: scale as above, shift = 0, so that folding it
rewrites the producer's weight alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import GraphModule

from passes.base import PassResult, annotation, finish, graph_pass, start
from passes.errors import PassError
from passes.modules import insert_module_after, inserted_modules, module_device, named_nodes
from passes.moments import _EXACT, _SMALL, ChannelSums, ShiftChoices, _split, broadcast_shape

RESET_PREFIX = "_gr_reset"
MODES = ("collect", "apply")


def _named(who) -> str:
    """``who`` of ``_check_channels``: a name, or a function giving it."""
    return who() if callable(who) else who


def _check_channels(x: torch.Tensor, dim: int, channels: int, who) -> int:
    """``dim`` as a non-negative axis of ``x``, checked; ``who`` names the module in the error (a
    string, or a function giving it: the name is only built when there is an error)."""
    if not -x.ndim <= dim < x.ndim:
        raise PassError(f"{_named(who)}: channel axis {dim} is out of range for an input of shape {tuple(x.shape)}")
    dim %= x.ndim
    if x.shape[dim] != channels:
        raise PassError(
            f"{_named(who)} has {channels} channels but its input has {x.shape[dim]} along axis {dim} "
            f"(shape {tuple(x.shape)}); check the channel axis"
        )
    return dim


class ChannelAffine(nn.Module):
    """y = x * scale + shift, with (C,) ``scale`` and ``shift`` broadcast along axis ``dim``."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, dim: int = 1, source: str = "") -> None:
        super().__init__()
        if scale.ndim != 1 or scale.shape != shift.shape:
            raise PassError(
                f"ChannelAffine needs 1-D scale and shift of the same length, got "
                f"{tuple(scale.shape)} and {tuple(shift.shape)}"
            )
        self.dim = dim
        self.source = source
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = _check_channels(x, self.dim, self.scale.shape[0], f"ChannelAffine at {self.source!r}")
        shape = broadcast_shape(x.ndim, dim)
        return x * self.scale.to(x.dtype).view(shape) + self.shift.to(x.dtype).view(shape)

    def as_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) in float64."""
        return self.scale.double(), self.shift.double()

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, dim={self.dim}, source={self.source!r}"


# from this many elements a batch of conv maps takes BatchNorm's kernel in ``channel_affine``
# (measured: 16,384 elements of 8 x 8 maps break even, 32,768 take 13 against 22 us)
_AFFINE_MIN = 1 << 15


def channel_affine(x: torch.Tensor, dim: int, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``torch.addcmul(shift, x, scale)`` with the (C,) ``scale`` and ``shift`` (of x's dtype)
    along axis ``dim``: one fused multiply-add per element.

    On a contiguous float32 or float64 tensor on the CPU, BatchNorm's inference kernel on x seen
    as (pre, C, post), with ``scale`` as weight, ``shift`` as bias, running mean 0, running
    variance 1 and eps 0: its per-channel factor 1 / sqrt(1 + 0) is exactly 1 and its offset
    shift - 0 * scale exactly ``shift`` (``scale`` >= 0 and finite: a reset's), so it computes
    the same x * scale + shift with the same fused multiply-add: addcmul's numbers, bit for bit
    (signed zeros too) on the machine this was measured on (AVX-512), in about half the time where
    each channel of each sample has several positions (a 500 x 32 x 32 x 32 batch: 8.3 -> 4 ms;
    addcmul's loop over three operands, two of them broadcast along the positions, is the slow
    one). Elsewhere addcmul: CUDA, half types, other layouts, rows (channels last: addcmul's inner
    loop runs along the channels and is the faster one, 500 x 512: 18 against 41 us) and batches
    under ``_AFFINE_MIN`` elements (the kernel's fixed cost, about 10 us)."""
    split = (_split(x, dim) if x.dtype in _EXACT and x.device.type == "cpu" and scale.dtype == x.dtype
             and x.numel() >= _AFFINE_MIN else None)
    if split is None or split[2] < 2:
        shape = broadcast_shape(x.ndim, dim)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))
    pre, c, post = split
    return torch.native_batch_norm(x.view(pre, c, post), scale, shift, torch.zeros(c, dtype=x.dtype),
                                   torch.ones(c, dtype=x.dtype), False, 0.0, 0.0)[0].view(x.shape)


def _finite(mean: torch.Tensor, spread: torch.Tensor) -> bool:
    """Whether ``mean`` and ``spread`` (a std or a variance) are finite with ``spread >= 0``."""
    return bool(torch.isfinite(mean).all() and torch.isfinite(spread).all() and (spread >= 0).all())


def _check_goals(source: str, c: int, goal_mean: torch.Tensor, goal_std: torch.Tensor, checked: bool = False) -> None:
    """PassError naming the reset at ``source`` unless its goals have shape (c,) and (``checked``:
    the caller has found it so) are finite with ``goal_std >= 0``."""
    if goal_mean.shape != (c,) or goal_std.shape != (c,):
        raise PassError(f"reset at {source!r}: goal_mean and goal_std must have shape ({c},), got "
                        f"{tuple(goal_mean.shape)} and {tuple(goal_std.shape)}")
    if not checked and not _finite(goal_mean, goal_std):
        raise PassError(f"reset at {source!r}: goal statistics must be finite with goal_std >= 0")


class Reset(nn.Module):
    """REPAIR's reset node (see the module doc); starts in "collect" mode."""

    def __init__(
        self,
        num_channels: int,
        dim: int = 1,
        eps: float = 1e-5,
        goal_mean: torch.Tensor | None = None,
        goal_std: torch.Tensor | None = None,
        source: str = "",
        scale_only: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.source = source
        self.scale_only = scale_only  # y = scale * x: the mean is left as it is (see the module doc)
        self.mode = "collect"
        self.last_ndim: int | None = None
        goal_mean = torch.zeros(num_channels) if goal_mean is None else goal_mean.detach().clone()
        goal_std = torch.ones(num_channels) if goal_std is None else goal_std.detach().clone()
        _check_goals(source, num_channels, goal_mean, goal_std)
        self.register_buffer("goal_mean", goal_mean.float())
        self.register_buffer("goal_std", goal_std.float())
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.count = 0  # samples per channel accumulated in collect mode
        # collect mode chooses the sums' shift instead of adding a batch: True, now; a
        # ``moments.ShiftChoices``, with the other holders' when it decides
        self.calibrating: bool | ShiftChoices = False
        self.stats_set = False  # running stats given by set_running
        self._stale = False  # the sums hold batches the running stats do not show yet
        self.sums = ChannelSums(dim, channels=num_channels)
        self.batch_goal: tuple[torch.Tensor, torch.Tensor] | None = None  # see set_batch_goal

    def set_batch_goal(self, mean: torch.Tensor | None, std: torch.Tensor | None = None) -> None:
        """The (mean, std) that collect mode gives the next batches instead of the goal (None:
        the goal again). Only what the output of collect mode looks like changes; the statistics
        collected, apply mode and the fold use the goal as always."""
        if mean is None:
            self.batch_goal = None
            return
        c = self.num_channels
        if mean.shape != (c,) or std is None or std.shape != (c,):
            raise PassError(f"reset at {self.source!r}: a batch goal needs mean and std of shape ({c},)")
        like = self._buffers["goal_mean"]  # (no op where the goal is already of its dtype and device)
        same = mean.dtype == std.dtype == like.dtype and mean.device == std.device == like.device
        # a plain attribute, set once per batch: past nn.Module.__setattr__'s checks
        self.__dict__["batch_goal"] = (mean, std) if same else (mean.to(like), std.to(like))

    @property
    def num_channels(self) -> int:
        return int(self._buffers["goal_mean"].shape[0])

    def _who(self) -> str:
        return f"reset at {self.source!r}"

    @property
    def ready(self) -> bool:
        """True when the running statistics come from data or from ``set_running``."""
        return self.count > 0 or self.stats_set

    def restart(self, goal_mean: torch.Tensor, goal_std: torch.Tensor, *, checked: bool = False) -> None:
        """Start again in collect mode with the goals ``goal_mean``, ``goal_std`` (checked as the
        constructor checks them) and no statistics, in new buffers on the reset's device (the old
        tensors are not written: another module may hold them). ``checked``: the caller has found
        the goals finite with ``goal_std >= 0`` (``restart_all`` checks many resets' at once)."""
        c = self.num_channels
        _check_goals(self.source, c, goal_mean, goal_std, checked)
        device = self._buffers["goal_mean"].device
        self._buffers["goal_mean"] = goal_mean.detach().to(device, torch.float32, copy=True)
        self._buffers["goal_std"] = goal_std.detach().to(device, torch.float32, copy=True)
        self._buffers["running_mean"] = torch.zeros(c, device=device)
        self._buffers["running_var"] = torch.ones(c, device=device)
        self.mode = "collect"
        self.count, self.stats_set, self._stale, self.calibrating = 0, False, False, False
        self.sums = ChannelSums(self.dim, channels=c)
        self.__dict__["last_ndim"] = None
        self.__dict__["batch_goal"] = None

    def reset_stats(self) -> None:
        """Forget the accumulated statistics (running stats back to mean 0, variance 1)."""
        self.count = 0
        self.stats_set = False
        self._stale = False
        self.sums = ChannelSums(self.dim, channels=self.num_channels)
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def set_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Set the statistics that apply mode normalises with (closed-form REPAIR)."""
        c = self.num_channels
        if mean.shape != (c,) or var.shape != (c,):
            raise PassError(
                f"reset at {self.source!r}: set_running needs mean and var of shape ({c},), got "
                f"{tuple(mean.shape)} and {tuple(var.shape)}"
            )
        if not _finite(mean, var):
            raise PassError(f"reset at {self.source!r}: set_running needs finite mean and var >= 0")
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        self.stats_set, self._stale = True, False

    def as_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) in float64 such that apply mode computes y = scale * x + shift."""
        scale = self.goal_std.double() / (self.running_var.double() + self.eps).sqrt()
        if self.scale_only:
            return scale, torch.zeros_like(scale)
        shift = self.goal_mean.double() - self.running_mean.double() * scale
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = _check_channels(x, self.dim, self.num_channels, self._who)
        if self.mode == "apply":
            shape = broadcast_shape(x.ndim, dim)
            # in the buffers' dtype (float64 only for folding, see as_affine)
            scale = self.goal_std * torch.rsqrt(self.running_var + self.eps)
            shift = torch.zeros_like(scale) if self.scale_only else self.goal_mean - self.running_mean * scale
            return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)
        self.__dict__["last_ndim"] = x.ndim  # a plain attribute: nn.Module.__setattr__'s checks cost 4 us a call
        if self.calibrating:  # ``ChannelSums.calibrate``: the shift, nothing counted
            self.sums.calibrate(x, self.calibrating if isinstance(self.calibrating, ShiftChoices) else None)
            rows = x.detach().movedim(dim, -1).reshape(-1, x.shape[dim]).double()
            return self._to_goal(x, dim, rows.mean(0), rows.var(0, correction=0), self.goal_mean, self.goal_std)
        goal_mean, goal_std = self.batch_goal or (self._buffers["goal_mean"], self._buffers["goal_std"])
        split = (_split(x, dim) if not self.scale_only and x.numel() > x.shape[dim] and x.dtype in _EXACT
                 and (x.is_cuda or x.numel() <= _SMALL) else None)
        if split is not None:
            # BatchNorm's own kernel on x seen as (pre, C, post): the batch's mean and variance
            # and the output in one fused op (on CPU the fewest calls for small tensors; for large
            # ones two reductions and one multiply-add are faster). Half types take the sums
            # below, reduced in float32 (the kernel may return their statistics in half).
            pre, c, post = split
            if goal_std.dtype != x.dtype:
                goal_mean, goal_std = goal_mean.to(x.dtype), goal_std.to(x.dtype)
            out, mean, invstd = torch.native_batch_norm(
                x.view(pre, c, post), goal_std, goal_mean, None, None, True, 0.0, self.eps)
            self.sums.add_moments(pre * post, mean, invstd=invstd, eps=self.eps)  # (itself without grad)
            self._collected()
            return out.view(x.shape)
        with torch.no_grad():
            self.sums.update(x)
        self._collected()
        mean, var = self.sums.batch_moments()
        # the batch's sums are not held until the next batch, among its activations (a long-lived
        # small block there fragments glibc's heap: see ``passes.pair_tap.KeptBatches``)
        self.sums.batch = None
        return self._to_goal(x, dim, mean, var, goal_mean, goal_std)

    def _to_goal(self, x: torch.Tensor, dim: int, mean: torch.Tensor, var: torch.Tensor,
                 goal_mean: torch.Tensor, goal_std: torch.Tensor) -> torch.Tensor:
        """``x`` with the batch's float64 ``mean`` and ``var`` along ``dim`` moved to the goal's
        (scale and shift in float64, applied in x's dtype by ``channel_affine``; scale only where
        ``scale_only``)."""
        scale = goal_std.double() * torch.rsqrt(var + self.eps)
        shift = torch.zeros_like(scale) if self.scale_only else goal_mean.double() - mean * scale
        return channel_affine(x, dim, scale.to(x.dtype), shift.to(x.dtype))

    def raw_totals(self) -> list[torch.Tensor]:
        """The collected sums about zero (``ChannelSums.raw_totals``), e.g. to add those of
        several processes; ``load_raw_totals`` takes such sums back as the collected statistics."""
        return self.sums.raw_totals()

    def load_raw_totals(self, parts: list[torch.Tensor]) -> None:
        self.sums.load_raw_totals(parts)
        self._collected()

    def _collected(self) -> None:
        # plain attributes, set once per batch: past nn.Module.__setattr__ (its type checks are
        # about a fifth of what a small reset's batch costs: 73 -> 66 us for 500 x 128)
        self.__dict__.update(count=self.sums.n, stats_set=False, _stale=True)

    def _sync(self) -> None:
        """Write the accumulated statistics into the running buffers (read through ``_buffers``:
        attribute access comes back here)."""
        if self.__dict__.get("_stale"):
            self._stale = False
            with torch.no_grad():
                mean, var = self.sums.moments()  # (both from one computation)
                self._buffers["running_mean"].copy_(mean)
                self._buffers["running_var"].copy_(var)

    def __getattr__(self, name: str):
        # running_mean / running_var are written lazily: once per read, not once per batch
        if name in ("running_mean", "running_var"):
            self._sync()
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._sync()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        only = ", scale_only=True" if self.scale_only else ""
        return f"{self.num_channels}, dim={self.dim}, eps={self.eps}, mode={self.mode}{only}, source={self.source!r}"


@dataclass(frozen=True)
class ResetSpec:
    """A reset on a node: channel axis and (C,) goal statistics."""

    dim: int
    goal_mean: torch.Tensor
    goal_std: torch.Tensor
    eps: float = 1e-5
    scale_only: bool = False  # correct the spread only (a producer with no bias), see the module doc


@graph_pass(in_place=False)
def insert_resets(gm: GraphModule, points: dict[str, ResetSpec], inplace: bool = False) -> PassResult:
    """Insert a Reset (collect mode) after each node named in ``points``.

    counts: {"resets": number inserted}. Look them up with ``resets(gm)``.
    """
    gm = start(gm, inplace, "insert_resets")
    nodes = named_nodes(gm, points, "insert_resets")
    device = module_device(gm)
    for name, spec in points.items():
        reset = Reset(
            int(spec.goal_mean.shape[0]) if spec.goal_mean.ndim == 1 else -1,
            dim=spec.dim,
            eps=spec.eps,
            goal_mean=spec.goal_mean,
            goal_std=spec.goal_std,
            source=name,
            scale_only=spec.scale_only,
        ).to(device)
        insert_module_after(gm, nodes[name], reset, RESET_PREFIX, "insert_resets")
    finish(gm)
    return PassResult(gm, bool(points), {"resets": len(points)}, [])


def remove_resets(gm: GraphModule, points) -> int:
    """Take the resets after the nodes named in ``points`` out of ``gm``'s graph, in place (their
    users read the node again; the caller's graph, not a pass of its own). Returns how many."""
    points = set(points)
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and annotation(node).get("after") in points \
                and isinstance(gm.get_submodule(str(node.target)), Reset):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(str(node.target))
            removed += 1
    if removed:
        finish(gm)
    return removed


def resets(gm: GraphModule) -> dict[str, Reset]:
    """The resets in ``gm``'s graph, keyed by the name of the node each follows."""
    return inserted_modules(gm, Reset)


def restart_all(found: dict[str, Reset], goals: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``Reset.restart`` of every reset of ``found`` (keyed as ``resets`` keys them) with its
    (goal mean, goal std) in ``goals``, the goals checked all at once (one reduction instead of
    three per reset); where a check fails, each reset checks its own, and the first bad one
    raises naming itself."""
    if not found:
        return
    checked = _finite(torch.cat([goals[k][0].reshape(-1).double() for k in found]),
                      torch.cat([goals[k][1].reshape(-1).double() for k in found]))
    for k, r in found.items():
        r.restart(*goals[k], checked=checked)


@graph_pass(in_place=True)
def set_mode(gm: GraphModule, mode: str) -> PassResult:
    """Switch every reset in ``gm`` to "collect" or "apply", in place (the graph is unchanged; the
    resets' mode is). counts: {"resets": resets switched to ``mode`` from the other one}."""
    if mode not in MODES:
        raise PassError(f"reset mode must be one of {MODES}, got {mode!r}")
    found = resets(gm)
    if mode == "apply":
        empty = [name for name, r in found.items() if not r.ready]
        if empty:
            raise PassError(
                f"resets after {', '.join(map(repr, empty))} have no statistics; run the model on "
                "data in collect mode, or call set_running, before switching to apply"
            )
    switched = 0
    for r in found.values():
        switched += r.mode != mode
        r.mode = mode
        r._sync()  # apply mode reads the running buffers: write them now, not inside a trace
    return PassResult(gm, switched > 0, {"resets": switched}, [])
