"""The ``pipeoptim`` console script: imports the command line (and with it torch, numpy and
pulp: 1-3 s) with Ctrl-C held back, then ends a run interrupted meanwhile as one interrupted
during a command ends."""

from __future__ import annotations

import importlib
import json
import signal
import sys


def main() -> None:
    """Run the command line. A Ctrl-C while it is imported is held until the import has
    finished, then exits with 130 and one line (with ``--json``, also ``{"error":
    "interrupted", "exit_code": 130}`` on stdout), as a Ctrl-C during a command does.

    Held, not raised where it lands: a KeyboardInterrupt inside numpy's import, which torch's
    C code starts and whose failure it discards, left numpy half-loaded and the run went on to
    a RecursionError; one inside ``import highspy``, under a bare ``except:`` in pulp, was
    lost and the run trained to its end."""
    received: list[int] = []
    held = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not where ignored
    if held:
        signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        commands = importlib.import_module("pipeoptim.cli.main")
    finally:
        if held:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        print("interrupted while starting: nothing was run", file=sys.stderr)
        if "--json" in sys.argv[1:]:
            print(json.dumps({"error": "interrupted", "exit_code": 130}))
        sys.exit(130)
    commands.main()
