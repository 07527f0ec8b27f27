"""The ``pipeoptim`` command."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator

import click

from pipeoptim.cli.entry import exit_interrupted, holding_ctrl_c, ignore_ctrl_c, release_ctrl_c
from pipeoptim.cli.partition import partition
from pipeoptim.cli.train import train_command


class _Commands(click.Group):
    """With ``--json``, a failure also prints ``{"error": message, "exit_code": code}`` on
    stdout (the message stays on stderr), so that a script reading stdout gets an object, not
    an empty string. Ctrl-C exits with 130 (click's "Aborted!" exited with 1); a SIGTERM
    (``kill``, ``timeout``, Slurm, ``docker stop``) stops the run the same way and exits with
    143 (128 + 15, as the signal's default would): it ended the process at once, the stages'
    workers left to notice and a running record left ``running`` for good."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["pipeoptim.json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> object:
        terminated: list[bool] = []  # a SIGTERM came (it raised KeyboardInterrupt)
        held = holding_ctrl_c()  # as the console script, Ctrl-C was held until now
        try:
            if held:
                release_ctrl_c()
            with _terminate_as_interrupt(terminated):
                return super().invoke(ctx)
        except click.ClickException as exc:
            if ctx.meta.get("pipeoptim.json"):
                json.dump({"error": exc.format_message(), "exit_code": exc.exit_code}, sys.stdout)
                sys.stdout.write("\n")
            raise
        except SystemExit as exc:  # Ctrl-C: the command said why on stderr and exits with 130
            if exc.code != 130:
                raise
            _interrupted(ctx, terminated)
        except KeyboardInterrupt:  # a command without its own handler (partition): as train does
            click.echo("interrupted: no plan was saved", err=True)  # files are written atomically
            _interrupted(ctx, terminated)
        finally:
            if held:
                ignore_ctrl_c()


def _interrupted(ctx: click.Context, terminated: list[bool]) -> None:
    """Exit as an interrupted command: 130 after Ctrl-C, 143 after SIGTERM."""
    exit_interrupted(143 if terminated else 130, as_json=bool(ctx.meta.get("pipeoptim.json")))


@contextlib.contextmanager
def _terminate_as_interrupt(terminated: list[bool]) -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while a command runs (in the main thread only, where
    Python runs signal handlers), so it stops every stage and records the run as Ctrl-C does;
    ``terminated`` gets an entry."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        terminated.append(True)
        raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeoptim")
def cli() -> None:
    """Compile a PyTorch model into a pipeline-parallel trainer (PipeOptim and baselines)."""


cli.add_command(partition)
cli.add_command(train_command)


def main() -> None:
    """Console-script entry point."""
    cli()
