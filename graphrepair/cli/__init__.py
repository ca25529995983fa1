"""The ``graphrepair`` command line: inspect, merge, barrier, export, demo.

One module per command (``inspect.py``, ``merge.py``, ``barrier.py``, ``export.py``, ``demo.py``);
what they share: ``common.py`` (the session of a run, how it ends: one line and exit 2 for bad
input, 128 + n for a signal), ``options.py`` (options and their values), ``inputs.py`` (models,
data and files, checked before any long computation). Output files are written atomically and all
together (``io/outputs.py``), so a failed or interrupted command leaves no partial file. Progress
bars (stderr) cover every pass over data; ``--quiet`` turns them off. Models and in-memory data go
to ``--device`` once, up front.

Only click and the standard library are imported here: torch comes in inside the commands, after
the signal handlers are installed, so that Ctrl-C in the first second is an ordinary interrupt.
"""

from __future__ import annotations

import os
import sys

try:
    import click

    from graphrepair.cli import barrier, demo, export, inspect, merge
    from graphrepair.cli.common import Main, Session, fail
except KeyboardInterrupt:  # Ctrl-C before the command line has its handlers: still one line
    sys.stderr.write("graphrepair: error: interrupted\n")
    raise SystemExit(130) from None


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bars (they are shown only when stderr is a terminal anyway).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where models run.")
@click.version_option(package_name="graphrepair")
@click.pass_obj
def main(session: Session, debug: bool, quiet: bool, device: str) -> None:
    """Discover permutation symmetries of PyTorch models, merge models with REPAIR, export ONNX."""
    # Progress bars only on a terminal: piped or captured stderr keeps just the messages.
    session.debug, session.quiet, session.device = debug, quiet or not _is_terminal(sys.stderr), device
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:  # under torchrun: join the run
        from graphrepair.cli.launch import launch
        from graphrepair.errors import GraphRepairError

        try:
            launch(device, debug)  # ranks but 0 print nothing
        except GraphRepairError as e:
            fail(str(e))


for _module in (inspect, merge, barrier, export, demo):
    main.add_command(_module.command)

if __name__ == "__main__":  # pragma: no cover
    main()
