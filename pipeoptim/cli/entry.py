"""The ``pipeoptim`` console script: holds Ctrl-C from its start until a command runs, so that
one arriving while the command line is imported (torch, numpy and pulp: 1-3 s) or while click
starts ends the run as one during a command does; ignores it once the command has ended."""

from __future__ import annotations

import importlib
import json
import signal
import sys
from typing import NoReturn

_held: list[int] = []  # the Ctrl-Cs that came while held


def _hold(signum: int, _frame: object) -> None:
    _held.append(signum)


def main() -> None:
    """Run the command line. A Ctrl-C while it is imported is held until the import has
    finished, then exits with 130 and one line (with ``--json``, also ``{"error":
    "interrupted", "exit_code": 130}`` on stdout), as a Ctrl-C during a command does; one
    after the import is held until the command starts (:func:`release_ctrl_c`).

    Held, not raised where it lands: a KeyboardInterrupt inside numpy's import, which torch's
    C code starts and whose failure it discards, left numpy half-loaded and the run went on to
    a RecursionError; one inside ``import highspy``, under a bare ``except:`` in pulp, was
    lost and the run trained to its end; one while click started printed a traceback."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where ignored
        signal.signal(signal.SIGINT, _hold)
    commands = importlib.import_module("pipeoptim.cli.main")
    # torch imports dynamo (0.5 s, with inductor's utilities and DTensor) when it builds its
    # first optimizer, which every command does: here, with Ctrl-C held (one inside that import
    # left torch half-initialized, and the run ended in an AttributeError traceback, exit 1)
    importlib.import_module("torch._dynamo")
    if _held:
        print("interrupted while starting: nothing was run", file=sys.stderr)
        exit_interrupted(130, as_json="--json" in sys.argv[1:])
    commands.main()


def exit_interrupted(code: int, as_json: bool) -> NoReturn:
    """Exit as an interrupted run with ``code`` (130 after Ctrl-C, 143 after SIGTERM); with
    ``as_json`` (``--json``), first print ``{"error": "interrupted", "exit_code": code}`` on
    stdout. The caller has said why on stderr."""
    if as_json:
        print(json.dumps({"error": "interrupted", "exit_code": code}))
    sys.exit(code)


def holding_ctrl_c() -> bool:
    """Whether :func:`main` holds Ctrl-C (the command line runs as the console script, not
    inside another program, such as a test's ``CliRunner``)."""
    return signal.getsignal(signal.SIGINT) is _hold


def release_ctrl_c() -> None:
    """Give Ctrl-C back to Python's default handler as a command starts, and raise the
    KeyboardInterrupt of one held meanwhile.

    Raises:
        KeyboardInterrupt: a Ctrl-C came while it was held.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if _held:
        raise KeyboardInterrupt


def ignore_ctrl_c() -> None:
    """Ignore Ctrl-C once the command has ended: one then cut the interpreter's exit short,
    ending a complete run by the signal or with a traceback from torch's exit hooks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
