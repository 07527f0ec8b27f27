"""The ``pipeoptim`` console script: imports the command line (and with it torch, 1-3 s) only
once a Ctrl-C during that import can end the process as one during a command does."""

from __future__ import annotations

import importlib
import json
import sys


def main() -> None:
    """Run the command line. A Ctrl-C while torch is imported exits with 130 and one line
    (with ``--json``, also ``{"error": "interrupted", "exit_code": 130}`` on stdout), as a
    Ctrl-C during a command does, not with Python's traceback."""
    try:
        commands = importlib.import_module("pipeoptim.cli.main")
    except KeyboardInterrupt:
        print("interrupted while starting: nothing was run", file=sys.stderr)
        if "--json" in sys.argv[1:]:
            print(json.dumps({"error": "interrupted", "exit_code": 130}))
        sys.exit(130)
    commands.main()
