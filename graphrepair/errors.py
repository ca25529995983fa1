"""Errors graphrepair raises on bad input.

Every message names the node, parameter or file at fault and says what to do. The CLI prints
``str(error)`` as one line and exits with status 2; ``--debug`` shows the traceback. Also here:
graphrepair's warnings (``GraphRepairWarning``, ``FewerExamplesWarning``) and ``interrupt_in``,
which finds the Ctrl-C or SIGTERM that a library turned into an error of its own.
"""

from __future__ import annotations


class GraphRepairError(Exception):
    """Base class of every error graphrepair raises on purpose."""


class TraceError(GraphRepairError):
    """The model could not be turned into an FX graph."""


class UnsupportedOpError(GraphRepairError):
    """An operation cannot be handled by a pass (not raised by discovery, which fixes axes instead)."""


class ShapeError(GraphRepairError):
    """The example input does not fit the model."""


class MismatchError(GraphRepairError):
    """Two models (or a model and a checkpoint) do not share an architecture."""


class CheckError(GraphRepairError):
    """A permutation changed what a model computes."""


class UnknownGroupError(GraphRepairError, KeyError):
    """A permutation group the spec does not have (a KeyError too, as before it had a name)."""

    __str__ = Exception.__str__  # the message as written, not KeyError's quoted form


class PermutationError(GraphRepairError, ValueError):
    """A group's permutation that is not a permutation of the group's channels (a ValueError too)."""


class DataError(GraphRepairError):
    """Input data is missing, empty, of the wrong shape, or not finite."""


class CheckpointError(GraphRepairError):
    """A checkpoint file cannot be read or does not fit the model."""


class LoadError(GraphRepairError):
    """A MODULE:FACTORY (or MODULE:FUNCTION) reference cannot be imported or called."""


class ExportError(GraphRepairError):
    """ONNX export failed or onnxruntime disagrees with torch."""


class NumericError(GraphRepairError):
    """NaN or Inf in weights or statistics."""


class NoGroupsError(GraphRepairError):
    """The model has no permutation group: no hidden channel may move, nothing can be aligned."""


class OutputError(GraphRepairError):
    """An output file cannot be written (missing or read-only directory, path is a directory)."""


class GraphRepairWarning(UserWarning):
    """A warning of graphrepair's own (too few examples, ...); the command line reports it as a note."""


class FewerExamplesWarning(GraphRepairWarning):
    """The data held fewer examples than were asked for; the message gives the number used."""


class RankLostError(GraphRepairError):
    """A distributed run lost a process: a collective could not complete because another rank
    died or did not arrive within the process group's timeout."""


class TerminatedError(GraphRepairError):
    """The process was asked to stop (SIGTERM), e.g. by torchrun because another rank failed."""


def listed(items, shown: int = 3) -> str:
    """The first ``shown`` of ``items`` for a message, "a, b, c and 4 more"."""
    items = list(items)
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def interrupt_in(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The interrupt behind ``exc``: libraries (torch's exporter) turn one into errors of their own."""
    return next((e for e in exception_chain(exc) if isinstance(e, KeyboardInterrupt)), None)


def exception_chain(exc: BaseException | None):
    """``exc``, then its causes and contexts, each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
