"""click parameter types shared by the commands."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click
import torch

from pipeoptim.action_overhead import measure_action_overhead
from pipeoptim.units import parse_bandwidth, parse_bytes, parse_dtype, parse_shape


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
    if not seconds >= 0:  # also NaN
        raise ValueError(f"{text!r} is neither 'measure' nor a number of seconds >= 0")
    return seconds


SECONDS_OR_MEASURE = _Parsed("SECONDS|measure", _seconds_or_measure)

LATENCY = click.option(
    "--latency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="The plan's seconds per message between stages (alpha of alpha + bytes/bandwidth; "
    "pipeoptim.runtime.linkcost.measure_link measures both).",
)
ACTION_OVERHEAD = click.option(
    "--action-overhead",
    type=SECONDS_OR_MEASURE,
    default=0.0,
    show_default=True,
    help="The plan's runtime CPU seconds per action (forward, backward, step) beyond the profiled "
    "compute; 'measure' times it with worker processes on this machine (a few seconds; 0.5-0.7 ms on "
    "a 2-core CPU machine, where 0 predicts a small model several times too fast).",
)


def overhead_seconds(value: float | str, log: Callable[[str], None]) -> float:
    """``--action-overhead``: its seconds, or for ``measure`` the measured ones (logged)."""
    if value != "measure":
        return float(value)
    seconds = measure_action_overhead()
    log(f"runtime overhead measured: {seconds * 1e3:.3f} ms per action")
    return seconds


def _bandwidth(text: str) -> float | None:
    return None if text.strip().lower() in ("inf", "none", "free") else parse_bandwidth(text)


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
BANDWIDTH = _Parsed("bandwidth", _bandwidth)
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
