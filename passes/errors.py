"""Errors raised by the graph passes.

``passes`` never imports ``graphrepair``; the application wraps these where it needs its own types.
Every message names the node (``node.format_node()``), module, parameter or file at fault and says
what to do about it.
"""

from __future__ import annotations


class PassError(Exception):
    """A pass was asked to do something it cannot do (unknown node, wrong mode, bad argument)."""


class ExportFailedError(PassError):
    """ONNX export could not produce a file (exporter error, unwritable directory, ...)."""


class ExportVerificationError(PassError):
    """onnxruntime disagrees with torch on an exported model; no file was written.

    Attributes:
        max_abs_diff: largest absolute difference found (``inf`` for a shape or count mismatch).
        output_name: readable path of the worst output in the model's output structure
            (e.g. ``"[0]"`` or ``"['logits']"``).
        output_index: position of that output among the flattened tensor outputs.
        where: index tuple of the worst element inside that output (``()`` for a scalar or when
            the shapes differ).
    """

    def __init__(
        self,
        message: str,
        *,
        max_abs_diff: float,
        output_name: str | None = None,
        output_index: int | None = None,
        where: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.output_name = output_name
        self.output_index = output_index
        self.where = where


class CopyError(PassError):
    """An object cannot be deep-copied, and it is the object being copied itself (not something it
    holds, which the copy shares instead: ``passes.base.deepcopy_quietly``)."""


class CopyWarning(UserWarning):
    """What a copy of a model could not copy: an object it holds that deepcopy refuses (a lock, an
    open file), which the copy shares with the original, or a tensor computed with autograd, whose
    copy holds its values without the graph (``passes.base.deepcopy_quietly``)."""
