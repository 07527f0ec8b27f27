"""The user's optimizer, mirrored per stage.

Each stage runs an optimizer of the user's class over its own parameters, with the user's
per-group hyperparameters. Hyperparameters are read from the user's optimizer for every
mini-batch (:func:`hyperparameters`), so a learning-rate scheduler stepping the user's
optimizer drives every stage.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

#: Group keys that are not hyperparameters.
_NOT_HYPER = {"params", "param_names"}


def hyperparameters(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Per-group hyperparameters of ``optimizer`` as plain values (tensor scalars as floats)."""
    out = []
    for group in optimizer.param_groups:
        hyper = {}
        for key, value in group.items():
            if key in _NOT_HYPER:
                continue
            hyper[key] = (
                float(value.item()) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            )
        out.append(hyper)
    return out


def param_group_names(optimizer: Optimizer, model: nn.Module) -> list[list[str]]:
    """Qualified names of the parameters of each group of ``optimizer`` (from ``model``).

    Raises:
        ValueError: the optimizer holds a tensor that is not a parameter of the model.
    """
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError(
                f"optimizer group {i} holds {len(missing)} tensor(s) that are not parameters of "
                f"{type(model).__name__}: build the optimizer from model.parameters()"
            )
        groups.append([names[id(p)] for p in group["params"]])
    return groups


def mirror(
    optimizer_class: type[Optimizer],
    defaults: Mapping[str, Any],
    groups: Sequence[Sequence[str]],
    hyper: Sequence[Mapping[str, Any]],
    params: Mapping[str, nn.Parameter],
    aliases: Mapping[str, str] = {},
) -> tuple[Optimizer | None, list[int]]:
    """An ``optimizer_class`` over the parameters of one stage.

    Args:
        optimizer_class: the user's optimizer class.
        defaults: the user's ``optimizer.defaults`` (constructor keywords).
        groups: parameter names of each user group (:func:`param_group_names`).
        hyper: hyperparameters of each user group (:func:`hyperparameters`).
        params: the stage's trainable parameters by name.
        aliases: other names of shared parameters, ``{alias: name in params}``.

    Returns:
        The optimizer (``None`` if the stage has no trainable parameters) and, for each of its
        groups, the index of the user group it mirrors.
    """
    stage_groups, group_map = [], []
    seen: set[int] = set()
    for index, names in enumerate(groups):
        chosen = []
        for name in names:
            p = params.get(name, params.get(aliases.get(name, ""), None))
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                chosen.append(p)
        if chosen:
            stage_groups.append({"params": chosen, **hyper[index]})
            group_map.append(index)
    if not stage_groups:
        return None, []
    accepted = inspect.signature(optimizer_class.__init__).parameters
    kwargs = {k: v for k, v in defaults.items() if k in accepted and k != "params"}
    return optimizer_class(stage_groups, **kwargs), group_map


def apply_hyperparameters(
    optimizer: Optimizer, group_map: Sequence[int], hyper: Sequence[Mapping[str, Any]]
) -> None:
    """Set the stage optimizer's groups to the user's hyperparameters ``hyper``."""
    for group, index in zip(optimizer.param_groups, group_map):
        for key, value in hyper[index].items():
            if isinstance(group.get(key), torch.Tensor):
                group[key].fill_(value)
            else:
                group[key] = value


class UpdateCostError(RuntimeError):
    """The optimizer could not be timed on a test parameter."""


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
) -> tuple[float, float]:
    """Seconds per parameter byte of one optimizer step, and of one weight prediction.

    Times the ``torch.optim`` class ``optimizer_class`` is or derives from (:func:`builtin_base`,
    with the user's defaults) stepping one ``numel``-element float32 parameter with a fresh
    gradient each time (median of ``repeats`` after two warm-up steps), and its predictor
    (:mod:`pipeoptim.runtime.predictors`) computing ΔW and ``Ŵ = W - 2·lr·ΔW`` into a reused
    buffer as the runtime does (:class:`pipeoptim.runtime.extrapolation.Extrapolator`; 0 without a
    predictor). On the CPU the time is the process's CPU time (``time.process_time``), which
    other processes' load does not inflate (wall time under load varied 23× between two
    measurements seconds apart); on an accelerator, wall time between synchronisations.
    A subclass's own ``__init__`` and ``step()`` are user code and are not run
    (their extra cost, if any, is not in the figure). Feeds
    :class:`pipeoptim.compiler.costmodel.CostConfig`.

    Raises:
        UpdateCostError: ``optimizer_class`` derives from no ``torch.optim`` optimizer (it is
            not timed: that would run its ``step()`` at compile time), or the base class
            cannot step a test parameter.
    """
    from pipeoptim.errors import PredictorError
    from pipeoptim.runtime.extrapolation import Extrapolator, per_unit_rate
    from pipeoptim.runtime.predictors import get_predictor

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
    try:
        predictor = get_predictor(optimizer)
    except PredictorError:
        return statistics.median(steps[2:]) / nbytes, 0.0
    extrapolator = Extrapolator({"w": param}, optimizer, per_unit_rate(predictor))
    buffers: dict[str, torch.Tensor] = {}

    def prediction() -> None:  # as the runtime predicts after each step: ΔW, then Ŵ into a buffer
        extrapolator.invalidate()
        buffers.update(extrapolator.predict([2 * float(optimizer.param_groups[0]["lr"])], buffers))

    predicts = [timed(prediction) for _ in range(2 + repeats)]
    return statistics.median(steps[2:]) / nbytes, statistics.median(predicts[2:]) / nbytes
