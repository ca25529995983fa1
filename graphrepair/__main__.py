"""``python -m graphrepair``. Until the command line installs its own signal handlers, a signal
ends the run at once with the usual one line (nothing has been written yet)."""

import signal
import sys


def _early_interrupt(signum, frame):
    sys.stderr.write("graphrepair: error: interrupted\n")
    raise SystemExit(128 + signum)


for _name in ("SIGINT", "SIGTERM", "SIGHUP"):
    if hasattr(signal, _name):
        signal.signal(getattr(signal, _name), _early_interrupt)

from graphrepair.cli import main  # noqa: E402

main(prog_name="graphrepair")
