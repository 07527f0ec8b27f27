"""The optimizer's update cost per parameter byte, for the plan's cost model.

A neutral layer between compiler and runtime: timing a step and a weight prediction needs the
runtime's predictors (:mod:`pipeoptim.runtime.predictors`), and the figures feed the compiler's
:class:`pipeoptim.compiler.costmodel.CostConfig`; the compiler itself imports nothing from the
runtime.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

from pipeoptim.compiler.profile_key import device_name
from pipeoptim.errors import PredictorError
from pipeoptim.fileio import read_json_table, write_json
from pipeoptim.runtime.extrapolation import Extrapolator, per_unit_rate
from pipeoptim.runtime.predictors import get_predictor


class UpdateCostError(RuntimeError):
    """The optimizer could not be timed on a test parameter."""


class UpdateCosts(NamedTuple):
    """Seconds per parameter byte of a stage's weight work (:func:`measure_update_cost`)."""

    step: float  # one optimizer step
    predict: float  # one weight prediction (ΔW, then Ŵ into a buffer); 0 without a predictor
    copy: float  # one copy of the weights (weight stashing, PipeDream-2BW's shadow)


def builtin_base(optimizer_class: type[Optimizer]) -> type[Optimizer] | None:
    """The first class in ``optimizer_class``'s MRO defined in ``torch.optim`` (itself for
    ``torch.optim.AdamW``; ``SGD`` for a user's ``class Clipped(SGD)``), not counting the
    abstract ``torch.optim.Optimizer``; ``None`` if there is none."""
    for cls in optimizer_class.__mro__:
        if cls is not Optimizer and cls.__module__.startswith("torch.optim.") and issubclass(cls, Optimizer):
            return cls
    return None


def measure_update_cost(
    optimizer_class: type[Optimizer],
    defaults: Mapping[str, Any],
    device: torch.device | str = "cpu",
    numel: int = 1 << 20,
    repeats: int = 9,
) -> UpdateCosts:
    """Seconds per parameter byte of one optimizer step, of one weight prediction and of one
    weight copy.

    Times the ``torch.optim`` class ``optimizer_class`` is or derives from (:func:`builtin_base`,
    with the user's defaults) stepping one ``numel``-element float32 parameter with a fresh
    gradient each time (median of ``repeats`` after two warm-up steps), and its predictor
    (:mod:`pipeoptim.runtime.predictors`) computing ΔW and ``Ŵ = W - 2·lr·ΔW`` into a reused
    buffer as the runtime does (:class:`pipeoptim.runtime.extrapolation.Extrapolator`; 0 without a
    predictor), and a copy of the parameter into a buffer (what weight stashing and 2BW's
    shadow do per step, :mod:`pipeoptim.runtime.stashing`). On the CPU the time is the
    process's CPU time (``time.process_time``), which other processes' load does not inflate
    (wall time under load varied 23× between two measurements seconds apart); on an
    accelerator, wall time between synchronisations.
    A subclass's own ``__init__`` and ``step()`` are user code and are not run
    (their extra cost, if any, is not in the figure). Feeds
    :class:`pipeoptim.compiler.costmodel.CostConfig`.

    Raises:
        UpdateCostError: ``optimizer_class`` derives from no ``torch.optim`` optimizer (it is
            not timed: that would run its ``step()`` at compile time), or the base class
            cannot step a test parameter.
    """
    base = builtin_base(optimizer_class)
    if base is None:
        raise UpdateCostError(
            f"{optimizer_class.__name__} derives from no torch.optim optimizer, and timing it would run "
            "its step() at compile time"
        )
    optimizer_class = base
    device = torch.device(device)
    param = torch.nn.Parameter(torch.randn(numel, device=device))
    accepted = inspect.signature(optimizer_class.__init__).parameters
    optimizer = optimizer_class(
        [param], **{k: v for k, v in defaults.items() if k in accepted and k != "params"}
    )

    clock = time.process_time if device.type == "cpu" else time.perf_counter

    def timed(fn: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start

    steps = []
    for _ in range(2 + repeats):
        param.grad = torch.randn_like(param)
        try:
            steps.append(timed(optimizer.step))
        except Exception as exc:  # a custom optimizer may not step on a lone parameter
            raise UpdateCostError(
                f"{optimizer_class.__name__}.step() failed on a test parameter: {exc}"
            ) from exc
    nbytes = numel * param.element_size()
    copy = torch.empty_like(param)
    copies = [timed(lambda: copy.copy_(param.detach())) for _ in range(2 + repeats)]
    step_s, copy_s = statistics.median(steps[2:]) / nbytes, statistics.median(copies[2:]) / nbytes
    try:
        predictor = get_predictor(optimizer)
    except PredictorError:
        return UpdateCosts(step_s, 0.0, copy_s)
    extrapolator = Extrapolator({"w": param}, optimizer, per_unit_rate(predictor))
    buffers: dict[str, torch.Tensor] = {}

    def prediction() -> None:  # as the runtime predicts after each step: ΔW, then Ŵ into a buffer
        extrapolator.invalidate()
        buffers.update(extrapolator.predict([2 * float(optimizer.param_groups[0]["lr"])], buffers))

    predicts = [timed(prediction) for _ in range(2 + repeats)]
    return UpdateCosts(step_s, statistics.median(predicts[2:]) / nbytes, copy_s)


UPDATE_COSTS_FILE = "update-costs.json"
#: how update costs are timed; figures saved under another clock are measured again
UPDATE_COST_CLOCK = "cpu-time-median-9, prediction by terms"


def load_or_measure_update_cost(
    optimizer_class: type[torch.optim.Optimizer],
    defaults: Mapping[str, Any],
    device: torch.device | str = "cpu",
    *,
    profile_dir: str | Path | None = "profiles",
    log: Callable[[str], None] = lambda _msg: None,
) -> UpdateCosts:
    """:func:`measure_update_cost`, remembered in
    ``<profile_dir>/update-costs.json`` under the optimizer class, its defaults, the device and
    the torch version (and how they were timed, on the CPU with how many torch threads), so
    that later plans of the same model and setting get the same figures (a plan must not change
    with timing noise); a new torch version or device is measured afresh. ``profile_dir=None``
    always measures.

    Returns:
        step, prediction and copy seconds per parameter byte.

    Raises:
        UpdateCostError: the optimizer cannot step a test parameter.
    """
    device = torch.device(device)
    if profile_dir is None:
        return measure_update_cost(optimizer_class, defaults, device)
    key = json.dumps(
        {
            "optimizer": f"{optimizer_class.__module__}.{optimizer_class.__qualname__}",
            "defaults": {k: repr(v) for k, v in sorted(defaults.items()) if k != "params"},
            "device": device_name(device),
            "torch": torch.__version__,
            "clock": UPDATE_COST_CLOCK,
            **({"threads": torch.get_num_threads()} if device.type == "cpu" else {}),
        },
        sort_keys=True,
    )
    path = Path(profile_dir) / UPDATE_COSTS_FILE
    table = read_json_table(path, "measuring optimizer update costs again", log)
    saved = table.get(key)
    if (
        isinstance(saved, list)
        and len(saved) == len(UpdateCosts._fields)
        and all(isinstance(v, float) for v in saved)
    ):
        return UpdateCosts(*saved)
    costs = measure_update_cost(optimizer_class, defaults, device)
    table[key] = list(costs)
    write_json(path, table)
    return costs
