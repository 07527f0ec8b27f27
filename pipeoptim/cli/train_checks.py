"""Checks of ``pipeoptim train``'s options made before any planning or measuring, so that a
mistake is reported at once with the option to change."""

from __future__ import annotations

import click

from pipeoptim.compiler.layouts import candidates
from pipeoptim.errors import PlanError
from pipeoptim.methods import get_method
from pipeoptim.sequential import SEQUENTIAL


def check_rows(batch_size: int, micro_batches: int | None, data_parallel) -> None:
    """Refuse, before any planning or measuring, a forced split of the mini-batch into more
    parts than it has rows (every replica's every micro-batch needs at least one row).

    Raises:
        click.BadParameter: --micro-batches times --data-parallel (each where given) above
            --batch-size.
    """
    replicas = None if data_parallel in (None, "auto") else int(data_parallel)
    parts = (micro_batches or 1) * (replicas or 1)
    if parts <= batch_size:
        return
    given = [
        (f"--{name}", n) for name, n in (("micro-batches", micro_batches), ("data-parallel", replicas)) if n
    ]
    split = " x ".join(f"{option} {value}" for option, value in given)
    fewer = "fewer parts" if len(given) > 1 else f"a smaller {given[0][0]}"
    raise click.BadParameter(
        f"{split} split{'s' if len(given) == 1 else ''} each mini-batch into {parts} parts, but --batch-size "
        f"{batch_size} gives it {batch_size} rows and every part needs at least one: give --batch-size "
        f"{parts} or more, or {fewer}",
        param_hint=[option for option, _ in given],  # what was given (--batch-size may be its default)
    )


def check_layout_options(
    method: str, micro_batches: int | None, data_parallel, stages: int | None, links: list[str], gpus: int
) -> None:
    """Refuse, before any planning or measuring, options the method would ignore or refuse
    later (``links``: the plan options the user gave, its link and runtime figures and
    ``--plan``).

    Raises:
        click.BadParameter: --micro-batches above 1 for a method that runs a mini-batch as one
            micro-batch.
        click.UsageError: --stages, --data-parallel, --micro-batches, --bandwidth, --latency,
            --action-overhead or --plan with sequential training.
        click.ClickException: a forced layout (--stages, --data-parallel) needs more than
            --gpus devices.
    """
    if method == SEQUENTIAL:
        given = [
            name
            for name, value in (
                ("--stages", stages),
                ("--data-parallel", data_parallel),
                ("--micro-batches", micro_batches),
            )
            if value not in (None, "auto")
        ] + links
        if given:
            raise click.UsageError(
                f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --method "
                "sequential (plain training in this process, no pipeline): drop "
                f"{'it' if len(given) == 1 else 'them'}, or choose a pipeline method"
            )
        return
    check_micro_batches_apply(method, micro_batches)
    check_forced_layout(gpus, stages, data_parallel)


def check_micro_batches_apply(method: str, micro_batches: int | None) -> None:
    """``--micro-batches`` above 1 only for a method that splits mini-batches (``train`` and
    ``partition``: partition saved a PipeOptim plan of 8 micro-batches, helper-152).

    Raises:
        click.BadParameter: it is given for a method that runs a mini-batch as one micro-batch.
    """
    if micro_batches not in (None, 1) and not get_method(method).micro_batched:
        raise click.BadParameter(
            f"method {method} runs each mini-batch as one micro-batch; --micro-batches applies to "
            "gpipe, 1f1b and 2bw: leave it unset",
            param_hint="--micro-batches",
        )


def check_forced_layout(gpus: int, stages: int | None, data_parallel: int | str | None) -> None:
    """A forced layout (``--stages``, ``--data-parallel``) that ``--gpus`` devices cannot hold is a
    usage error (exit 2, as every other option mistake; it exited 1, helper-136).

    Raises:
        click.UsageError: it needs more devices than ``--gpus``.
    """
    try:
        candidates(gpus, stages, None if data_parallel in (None, "auto") else int(data_parallel))
    except PlanError as exc:
        raise click.UsageError(str(exc)) from exc
