"""Optimizer-state bytes per parameter byte, from the optimizer (or its name), for the cost model
(:mod:`pipeoptim.compiler.costmodel`): what ``torch.optim`` keeps per parameter."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

#: Optimizer-state copies of the parameters kept by each ``torch.optim`` optimizer.
_STATE_FACTORS = {
    "sgd": 0,
    "momentum": 1,
    "adam": 2,
    "adamw": 2,
    "rmsprop": 1,
    "adagrad": 1,
    "adadelta": 2,
    "adamax": 2,
    "nadam": 2,
    "radam": 2,
}


def optimizer_state_factor(optimizer: Any) -> float:
    """Bytes of optimizer state per byte of parameters.

    ``optimizer`` is a ``torch.optim.Optimizer`` instance, judged by the ``torch.optim`` class
    it derives from (``class Clipped(SGD)`` as SGD) and each param group's hyperparameters:
    SGD 0, SGD with momentum 1, Adam/AdamW 2 or 3 with amsgrad, RMSprop 1 plus 1 for momentum
    and 1 for centered, Adagrad 1; where the groups differ, the largest of their factors (an
    upper bound: the plan's memory is never below what the stages hold). An optimizer derived
    from none of the table's counts 2 (Adam's), which is no bound: one keeping more state per
    parameter is under-counted (its code is not run to count it). Or one of the names
    ``sgd``, ``momentum``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad``, ``adadelta``,
    ``adamax``, ``nadam``, ``radam``.

    Raises:
        ValueError: unknown optimizer name.
    """
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in _STATE_FACTORS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(_STATE_FACTORS)}")
        return float(_STATE_FACTORS[key])
    base = builtin_base(type(optimizer)) or type(optimizer)
    name = base.__name__.lower()
    groups = [g for g in optimizer.param_groups if g.get("params")] or [{}]
    return max(_group_factor(name, group) for group in groups)


def builtin_base(optimizer_class: type[Optimizer]) -> type[Optimizer] | None:
    """The first class in ``optimizer_class``'s MRO defined in ``torch.optim`` (itself for
    ``torch.optim.AdamW``; ``SGD`` for a user's ``class Clipped(SGD)``), not counting the
    abstract ``torch.optim.Optimizer``; ``None`` if there is none."""
    for cls in optimizer_class.__mro__:
        if cls is not Optimizer and cls.__module__.startswith("torch.optim.") and issubclass(cls, Optimizer):
            return cls
    return None


def _group_factor(name: str, group: dict[str, Any]) -> float:
    if name == "sgd":
        return 1.0 if group.get("momentum", 0) else 0.0
    if name in ("adam", "adamw"):
        return 3.0 if group.get("amsgrad") else 2.0
    if name == "rmsprop":
        return 1.0 + bool(group.get("momentum", 0)) + bool(group.get("centered"))
    return float(_STATE_FACTORS.get(name, 2))
