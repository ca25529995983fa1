"""What every command shares: the session of one run, and how a run ends.

The promise (README): bad input ends with exit status 2 and ONE line on stderr, no traceback
(``--debug`` shows it), and leaves no partial file; a pre-existing output survives every failed
run. How a run ends:

=============================================  =====  ==============================================
what happened                                  exit   stderr
=============================================  =====  ==============================================
success                                        0      nothing but graphrepair's own warnings
GraphRepairError (bad input)                   2      ``graphrepair: error: <what is wrong>``
click usage error (``--alpha abc``)            2      the same, one line
SIGINT / SIGTERM / SIGHUP, also during imports 128+n  ``graphrepair: error: interrupted ...``, saying
                                                      whether the outputs are all old or all new
stdout closed (``| head -1``)                  0      nothing
anything else (a bug)                          1      ``graphrepair: error: internal error (...)``
=============================================  =====  ==============================================

Library chatter is captured while a command runs (unless ``--debug``): Python warnings, torch's
logging, and what torch prints on stderr (torch.fx prints the generated code of a GraphModule
that raises). graphrepair's own warnings (``GraphRepairWarning``) become the report's notes.

Signals: ``Main.main`` installs handlers for SIGINT, SIGTERM and SIGHUP that raise
:class:`Interrupted` (a KeyboardInterrupt, so that ``except Exception`` in libraries lets it
through and every ``finally`` removes its temporary files); only the first signal raises, later ones
are only recorded, so that the cleanup can finish. ``io.fileio.atomic_outputs`` holds the signals
back while it renames the outputs into place, so a run is interrupted before its outputs are all
written or after. The state of one run lives in its :class:`Session` (``ctx.obj``), never in the
module.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from graphrepair.errors import exception_chain, interrupt_in

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """Raised by the signal handlers of a run; ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def safe_text(text: str) -> str:
    """``text`` printable on any UTF-8 stream (file names that are not UTF-8 carry surrogates)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def one_line(text, limit: int | None = None) -> str:
    text = " ".join(safe_text(str(text)).split())
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."


class SignalGuard:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` while active (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                try:
                    self._previous[s] = signal.signal(s, self._handle)
                except (ValueError, OSError):
                    continue
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class _Captured(io.StringIO):
    """sys.stderr while a command runs: keeps what libraries print. Progress bars (``progress.py``)
    draw on ``progress_stream``, the real stderr."""

    def __init__(self, real) -> None:
        super().__init__()
        self.progress_stream = real


@dataclass
class Session:
    """One run of the command line: the global options and what the run has written."""

    debug: bool = False
    quiet: bool = True
    device: str = "auto"
    signals: SignalGuard = field(default_factory=SignalGuard)
    planned: list[Path] = field(default_factory=list)  # outputs the command will write
    written: list[Path] = field(default_factory=list)  # outputs in place (all of them, or none)
    warnings: list = field(default_factory=list)  # captured warnings.WarningMessage

    def notes(self) -> list[str]:
        """graphrepair's own warnings so far, once each."""
        from graphrepair.errors import GraphRepairWarning

        return list(dict.fromkeys(one_line(w.message) for w in self.warnings
                                  if issubclass(w.category, GraphRepairWarning)))

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Capture library chatter for the duration (see the module text); nothing with --debug."""
        if self.debug:
            yield
            return
        captured = _Captured(sys.stderr)
        level = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(captured):
                warnings.simplefilter("always")
                self.warnings = caught
                yield
        finally:
            logging.disable(level)

    @contextlib.contextmanager
    def outputs(self, paths: list) -> Iterator[list[Path | None]]:
        """``atomic_outputs`` for the command's files: written by the reporting process only,
        recorded in ``written`` once all are in place, and not committed at all once a signal
        came, even one a library swallowed (the run then ends as interrupted, outputs unchanged)."""
        from graphrepair.distributed import is_reporting
        from graphrepair.io.fileio import atomic_outputs

        with atomic_outputs(paths, written=self.written, writes=is_reporting(),
                            interrupted=lambda: self.signals.received) as tmps:
            yield tmps

    # -- how a run ends ---------------------------------------------------------------------------

    def interrupted(self, signum: int | None) -> None:
        signum = signum or signal.SIGINT
        name = signal.Signals(signum).name
        what = "interrupted" + ("" if signum == signal.SIGINT else f" ({name})")
        if self.written:
            what += f" after every output was written ({', '.join(str(p) for p in self.written)})"
        elif self.planned:
            what += "; no output was written (existing files are unchanged)"
        fail(what, 128 + signum)

    def end(self, exc: BaseException) -> None:
        """Exit for ``exc``, raised by a command (see the table in the module text)."""
        from graphrepair.errors import GraphRepairError

        if _broken_pipe_in(exc):  # also rich's SystemExit(1) after it met a closed stdout
            quiet_stdout_exit()
        if isinstance(exc, (SystemExit, click.exceptions.Exit, click.ClickException)):
            raise exc
        interrupt = interrupt_in(exc)
        if self.signals.received is not None or interrupt is not None:
            self.interrupted(self.signals.received or getattr(interrupt, "signum", None))
        if self.debug:
            raise exc
        if isinstance(exc, GraphRepairError):
            fail(one_line(exc))
        if isinstance(exc, click.exceptions.Abort):
            self.interrupted(None)
        fail(f"internal error ({type(exc).__name__}: {one_line(exc, 500)}); rerun with --debug for the "
             f"traceback and please report it", EXIT_INTERNAL)


def _broken_pipe_in(exc: BaseException) -> bool:
    return any(isinstance(e, BrokenPipeError) for e in exception_chain(exc))


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """The one line on stderr, and the exit."""
    text = f"graphrepair: error: {one_line(message)}\n"
    if _reporting():  # under torchrun: one line, from rank 0
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(text)
            sys.stderr.flush()
    exit_with(code)


def exit_with(code: int) -> None:
    """Exit with ``code``: a process that joined a distributed run ends in ``launch.end`` (its
    group is not torn down, whether the run failed or succeeded), any other with ``sys.exit``."""
    mod = sys.modules.get("graphrepair.cli.launch")  # imported (with torch) once a run has joined one
    if mod is not None:
        mod.end(code)
    sys.exit(code)


def _reporting() -> bool:
    """Whether this process reports (rank 0 of a distributed run, or the only process); the
    distributed module is only imported once a run has begun (it imports torch)."""
    mod = sys.modules.get("graphrepair.distributed")
    return mod is None or mod.is_reporting()


def quiet_stdout_exit() -> None:
    """stdout was closed by the reader (``| head``): nothing more to say, exit 0, and no complaint
    from Python's final flush."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    exit_with(0)


def run(fn):
    """Decorator of a command: ``fn(session, **options)`` runs with library chatter captured, and
    every way it can end becomes an exit status and at most one line (``Session.end``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        session = click.get_current_context().find_object(Session)
        try:
            with session.capture():
                from graphrepair import distributed

                with distributed.step("the command"):  # a failure on any rank ends every rank
                    fn(session, *args, **kwargs)
                sys.stdout.flush()
        except BaseException as exc:  # noqa: B036 -- every ending is classified in Session.end
            session.end(exc)
        if session.signals.received is not None:  # a library swallowed the interrupt
            session.interrupted(session.signals.received)

    return wrapper


class Main(click.Group):
    """The ``graphrepair`` group: installs the signal handlers for the run and turns click's own
    errors (usage errors, ``--alpha abc``) into one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        session = Session()
        with session.signals:
            try:
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, obj=session, **extra)
                sys.stdout.flush()
            except click.exceptions.NoArgsIsHelpError as e:
                click.echo(e.ctx.get_help())
                rv = 0
            except click.ClickException as e:
                hint = ""
                ctx = getattr(e, "ctx", None)
                if isinstance(e, click.UsageError) and ctx is not None:
                    hint = f" (see '{ctx.command_path} --help')"
                fail(f"{e.format_message()}{hint}", e.exit_code)
            except KeyboardInterrupt as e:  # while click parses (the commands catch their own)
                session.interrupted(session.signals.received or getattr(e, "signum", None))
            except click.exceptions.Abort as e:
                session.interrupted(session.signals.received or getattr(e.__context__, "signum", None))
            except BrokenPipeError:
                quiet_stdout_exit()
        if not standalone_mode:
            return rv
        exit_with(rv if isinstance(rv, int) else 0)


def echo(text: str = "") -> None:
    """A line of the report on stdout (file names that are not UTF-8 are shown, not a crash)."""
    click.echo(safe_text(text))


def echo_json(data: dict) -> None:
    echo(json.dumps(data, indent=2, default=str))
