"""click parameter types shared by the commands."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import click
import torch
from click.core import ParameterSource

from pipeoptim.machine_costs import load_or_measure_machine_costs
from pipeoptim.units import MAX_SECONDS, is_seconds, parse_bandwidth, parse_bytes, parse_dtype, parse_shape


class _Parsed(click.ParamType):
    def __init__(self, name: str, parse: Any) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf``: NaN passes every bound check
    (``--lr nan`` reached the workers and failed there as a NaN loss)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _layout_width(text: str) -> int | str:
    """``auto`` or a positive number of data-parallel replicas."""
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is neither 'auto' nor a positive number of replicas")
    return int(text)


LAYOUT_WIDTH = _Parsed("auto|R", _layout_width)


def _seconds_or_measure(text: str) -> float | str:
    """``measure`` or non-negative seconds."""
    if text.strip().lower() == "measure":
        return "measure"
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not is_seconds(seconds):
        raise ValueError(f"{text!r} is neither 'measure' nor a number of seconds from 0 to {MAX_SECONDS:.0f}")
    return seconds


SECONDS_OR_MEASURE = _Parsed("SECONDS|measure", _seconds_or_measure)


def _bandwidth(text: str) -> float | str | None:
    if text.strip().lower() == "measure":
        return "measure"
    return None if text.strip().lower() in ("inf", "none", "free") else parse_bandwidth(text)


BANDWIDTH = _Parsed("bandwidth|measure", _bandwidth)


def _measured(instead: str) -> str:
    """The help's sentence on 'measure', ``instead`` being what the option counts where the
    stages are not CPU worker processes."""
    return (
        "'measure': this machine's figure for stages that are CPU worker processes (gloo), measured "
        "once in a few seconds and cached in ~/.cache/pipeoptim/machine-costs.json or "
        f"$PIPEOPTIM_CACHE_DIR (delete it to measure again); with GPU stages or in one process: {instead}"
    )


def link_options(measured: bool) -> Callable[[Callable], Callable]:
    """--bandwidth, --latency and --action-overhead, defaulting to this machine's measured figures
    (``measured``: `pipeoptim train`, whose stages run here) or to a 25 GB/s link with no latency
    and no runtime overhead (`pipeoptim partition`, which plans for the devices described)."""
    options = [
        click.option(
            "--bandwidth",
            type=BANDWIDTH,
            default="measure" if measured else "25GB/s",
            show_default=True,
            help="Bandwidth between neighbouring stages, e.g. 25GB/s; 'inf': bytes cost no time (each "
            "message still costs --latency); replicas' gradient all-reduce is priced at it too, except "
            f"with 'measure', which measures gloo's all-reduce as well; {_measured('25GB/s')}.",
        ),
        click.option(
            "--latency",
            type=SECONDS_OR_MEASURE,
            default="measure" if measured else 0.0,
            show_default=True,
            help="The plan's seconds per message between stages (alpha of alpha + bytes/bandwidth); "
            f"{_measured('0')}.",
        ),
        click.option(
            "--action-overhead",
            type=SECONDS_OR_MEASURE,
            default="measure" if measured else 0.0,
            show_default=True,
            help="The plan's runtime CPU seconds per action (forward, backward, step) beyond the profiled "
            "compute (0.3-0.5 ms on a 2-core CPU machine, where 0 predicts a small model several times "
            f"too fast); {_measured('0')}.",
        ),
    ]

    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


class LinkFigures(NamedTuple):
    """The plan's link and runtime figures, every 'measure' resolved."""

    bandwidth: float | None  # bytes/s; None: communication is free
    latency: float  # seconds per message
    action_overhead: float  # seconds per action
    allreduce_bandwidth: float | None  # bytes/s of the replicas' all-reduce; None: ``bandwidth``'s
    allreduce_latency: float | None  # seconds each all-reduce costs beyond its bytes; None: the link's


def link_figures(
    bandwidth: float | str | None,
    latency: float | str,
    action_overhead: float | str,
    log: Callable[[str], None],
    not_measurable: str | None = None,
) -> LinkFigures:
    """The options' values with each ``measure`` replaced by this machine's figure
    (:func:`pipeoptim.machine_costs.load_or_measure_machine_costs`, logged when measured).

    ``not_measurable``: why this machine's CPU figures do not describe the stages (GPU stages,
    stages in one process); each ``measure`` then becomes the plan's plain default (a 25 GB/s
    link, no latency, no overhead), logged with the reason where the user gave ``measure``
    (not where it is the command's default, as documented in its help). Where the bandwidth is
    measured, so is the replicas' all-reduce (``allreduce_bandwidth``, ``allreduce_latency``);
    else it is priced as the link.
    """
    values = {"bandwidth": bandwidth, "latency": latency, "action_overhead": action_overhead}
    wanted = [name for name, value in values.items() if value == "measure"]
    values.update(allreduce_bandwidth=None, allreduce_latency=None)
    if wanted:
        if not_measurable is not None:
            given = click.get_current_context(silent=True)
            flags = ", ".join(
                "--" + name.replace("_", "-")
                for name in wanted
                if given is None or given.get_parameter_source(name) is not ParameterSource.DEFAULT
            )
            if flags:
                log(
                    f"not measuring {flags}: {not_measurable}; "
                    "the plan counts a 25 GB/s link, no message latency and no runtime overhead (give them "
                    "in seconds and bytes/s to price them)"
                )
            replacing = {"bandwidth": parse_bandwidth("25GB/s"), "latency": 0.0, "action_overhead": 0.0}
        else:
            replacing = load_or_measure_machine_costs(log=log)._asdict()
        values.update({name: replacing[name] for name in wanted})
        if "bandwidth" in wanted:
            values.update(
                {name: replacing.get(name) for name in ("allreduce_bandwidth", "allreduce_latency")}
            )
        elif not_measurable is None:  # the figures logged include the all-reduce's (helper-144)
            log("with replicas, their all-reduce is priced as messages of the link given by --bandwidth")
    return LinkFigures(**values)  # type: ignore[arg-type]


GPUS = click.option(
    "--gpus",
    "-n",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Devices (a worker process each, and a GPU where CUDA has enough) for N stages x R "
    "replicas, N*R <= --gpus, chosen by the planner unless --stages/--data-parallel force them.",
)

BYTES = _Parsed("size", parse_bytes)
SHAPE = _Parsed("shape", parse_shape)
DTYPE = _Parsed("dtype", parse_dtype)


def finite(x: float) -> float | None:
    """JSON-safe float (``None`` for inf/nan)."""
    return x if math.isfinite(x) else None


def torch_device(text: str | None) -> torch.device | None:
    """The ``--device`` value as a torch device (``None`` where not given).

    Raises:
        click.ClickException: not a torch device, or a CUDA device this torch build cannot use.
    """
    if not text:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise click.ClickException(f"--device {text} is not a torch device: use e.g. cpu or cuda:0") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(
            f"--device {text}: CUDA is not available in this torch build: use --device cpu"
        )
    return device


def json_alone(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` (a click callback with ``as_json``) run, under ``--json``, with what anything
    prints on stdout meanwhile (a user's factory or model) sent to stderr, so that stdout holds
    the JSON alone; ``command`` writes it to the ``stdout`` it is given (helper-157: a model's
    ``print`` came before the JSON)."""

    @functools.wraps(command)
    def run(**options: Any) -> Any:
        stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr) if options["as_json"] else contextlib.nullcontext():
            return command(**options, stdout=stdout)

    return run
