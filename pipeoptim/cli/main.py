"""The ``pipeoptim`` command."""

from __future__ import annotations

import click

from pipeoptim.cli.partition import partition
from pipeoptim.cli.train import train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeoptim")
def cli() -> None:
    """Compile a PyTorch model into a pipeline-parallel trainer (PipeOptim and baselines)."""


cli.add_command(partition)
cli.add_command(train_command)


def main() -> None:
    """Console-script entry point."""
    cli()
