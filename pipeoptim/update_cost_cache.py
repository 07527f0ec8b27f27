"""The optimizer's update costs cached in the profile folder (:func:`load_or_measure_update_cost`),
so that later plans of the same model and setting get the same figures."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeoptim.compiler.profile_key import device_name
from pipeoptim.fileio import read_json_table, update_json_table
from pipeoptim.update_cost import UpdateCosts, measure_update_cost

#: the cache's file in the profile folder
UPDATE_COSTS_FILE = "update-costs.json"
#: the most seconds per parameter byte a cached figure may hold (a step at 1 MB/s; measured
#: figures are near 1e-10): a larger one was edited by hand, and is measured again
MAX_CACHED_S_PER_BYTE = 1e-6
#: how update costs are timed; figures saved under another clock are measured again
UPDATE_COST_CLOCK = (
    "cpu-time-median-9, prediction by terms or in SGD's step (the faster of in pieces and whole, "
    "less that loop without it), model working set, gradient clipping"
)


def _work(value: Any) -> str:
    """A hyperparameter as far as it changes the step's work: a number as zero or not (the
    kernels of ``momentum=0.9`` and ``0.5`` are the same; a new learning rate timed the step
    again, and a sweep over learning rates got plans from timing noise, helper-115), a flag or
    name as it is."""
    if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
        kind = "tensor" if isinstance(value, torch.Tensor) else "number"
        return f"{kind} {'0' if bool(value == 0) else 'not 0'}"
    if isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):  # betas
        return "(" + ", ".join(_work(v) for v in value) + ")"
    return repr(value)


def load_or_measure_update_cost(
    optimizer_class: type[torch.optim.Optimizer],
    defaults: Mapping[str, Any],
    device: torch.device | str = "cpu",
    *,
    profile_dir: str | Path | None = "profiles",
    log: Callable[[str], None] = lambda _msg: None,
    elements: tuple[int, int] = (1 << 20, 1),
    beside: int = 0,
) -> UpdateCosts:
    """:func:`measure_update_cost` on ``elements`` (``(numel, tensors)``, from
    :func:`working_set`) with ``beside`` other ranks stepping at once, remembered in
    ``<profile_dir>/update-costs.json`` under the optimizer class, its defaults (as far as they
    change the step's work: :func:`_work`), the device,
    the working set, the ranks beside and the torch version (and how they were timed, on the CPU
    with how many torch threads), so
    that later plans of the same model and setting get the same figures (a plan must not change
    with timing noise); a new torch version or device is measured afresh. ``profile_dir=None``
    always measures.

    Returns:
        step, prediction and copy seconds per parameter byte.

    Raises:
        UpdateCostError: the optimizer cannot step a test parameter.
        ValueError: what :func:`measure_update_cost` raises for ``beside``.
    """
    device = torch.device(device)
    numel, tensors = elements
    if profile_dir is None:
        return measure_update_cost(optimizer_class, defaults, device, numel, tensors=tensors, beside=beside)
    key = json.dumps(
        {
            "optimizer": f"{optimizer_class.__module__}.{optimizer_class.__qualname__}",
            "defaults": {k: _work(v) for k, v in sorted(defaults.items()) if k != "params"},
            "device": device_name(device),
            "torch": str(torch.__version__),  # a plain str (torch.__version__ is a TorchVersion)
            "clock": UPDATE_COST_CLOCK,
            "numel": numel,
            "tensors": tensors,
            "beside": beside,
            **({"threads": torch.get_num_threads()} if device.type == "cpu" else {}),
        },
        sort_keys=True,
    )
    path = Path(profile_dir) / UPDATE_COSTS_FILE
    table = read_json_table(path, "measuring optimizer update costs again", log)
    saved = table.get(key)
    if _plausible(saved):
        return UpdateCosts(*saved)
    if key in table:
        fields = ", ".join(UpdateCosts._fields)
        log(
            f"measuring the optimizer's update costs again: {path} holds {json.dumps(saved)[:80]} for "
            f"this setting, not floats of seconds per byte ({fields}) from 0 to {MAX_CACHED_S_PER_BYTE:g}"
        )
    costs = measure_update_cost(optimizer_class, defaults, device, numel, tensors=tensors, beside=beside)
    try:
        update_json_table(path, key, list(costs))
    except OSError as exc:
        log(
            f"measured the optimizer's update costs, but could not save them in {path} ({exc}): choose a "
            "writable profile folder, or profile_dir=None to measure on every run"
        )
    return costs


def _plausible(saved: object) -> bool:
    """Whether ``saved`` (an entry of the cache) holds every :class:`UpdateCosts` figure, each
    a float of seconds from 0 to :data:`MAX_CACHED_S_PER_BYTE`: a hand-edited 1e308 stopped
    planning with a traceback, a negative figure made a stage's weight work cheaper than free,
    and 3000 s per byte (which the cost model takes) priced a plan at 2e-9 mini-batches/s."""
    return (
        isinstance(saved, list)
        and len(saved) == len(UpdateCosts._fields)
        and all(isinstance(v, float) and 0 <= v <= MAX_CACHED_S_PER_BYTE for v in saved)
    )
