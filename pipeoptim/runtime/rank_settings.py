"""Under torchrun every rank calls ``compile`` itself: its arguments must be the same on all.

Rank 0 plans and broadcasts the plan and the initial weights, but each rank builds its own
stage from its own arguments. With another learning rate on one rank the pipeline trained
silently mixed; with another method or micro-batch count gloo aborted mid-run ("Received data
size doesn't match"). :func:`check_same_on_every_rank` compares, right after the process
group is joined, what each rank's stage is built from (:func:`compile_settings`) and stops
every rank at once with the differences named.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeoptim.errors import PipelineError
from pipeoptim.runtime.optim import hyperparameters

#: differing settings named in the error; the rest are counted
SHOWN = 4


def _model(model: nn.Module) -> str:
    """The model's class and parameters' names and shapes (weights may differ: rank 0's are
    broadcast), e.g. ``Net: 6 parameter tensors, 264,842 values (shapes 3fa1c2d0)``."""
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:8]
    values = sum(p.numel() for p in model.parameters())
    return f"{type(model).__qualname__}: {len(shapes)} parameter tensors, {values:,} values (shapes {digest})"


def _callable(fn: Callable[..., Any]) -> str:
    """A function's or module's name (a module's repr gives its options: ``CrossEntropyLoss()``)."""
    return repr(fn) if isinstance(fn, nn.Module) else getattr(fn, "__qualname__", type(fn).__qualname__)


def compile_settings(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Sequence[torch.Tensor],
    loss_fn: Callable[..., Any],
    options: Mapping[str, Any],
) -> dict[str, str]:
    """What this rank's stage is built from, each as text: the model's class and parameter
    shapes, the example inputs' shapes and dtypes, the loss function, the optimizer's class
    and every param group's hyperparameters, and ``options`` (``compile``'s keyword arguments
    that shape a stage: method, micro-batches, ...)."""
    settings = {
        "model": _model(model),
        "example inputs": ", ".join(f"{list(x.shape)} {x.dtype}" for x in inputs),
        "loss_fn": _callable(loss_fn),
        "optimizer": type(optimizer).__qualname__,
        "param groups": str(len(optimizer.param_groups)),
        "optimizer state": "held (it has stepped)" if optimizer.state else "empty",
    }
    for i, group in enumerate(hyperparameters(optimizer)):
        settings.update({f"{key} of param group {i}": repr(value) for key, value in group.items()})
    settings.update({name: repr(value) for name, value in options.items()})
    return settings


def check_same_on_every_rank(settings: Mapping[str, str]) -> None:
    """Gather every rank's :func:`compile_settings` and compare them with rank 0's (a
    collective: every rank calls it, within the process group's timeout).

    Raises:
        PipelineError: on every rank, where any rank's settings differ from rank 0's; the
            message names up to :data:`SHOWN` of them with each rank's value.
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(settings))
    first = gathered[0]
    keys = sorted({key for theirs in gathered for key in theirs})
    differing = [key for key in keys if any(theirs.get(key) != first.get(key) for theirs in gathered)]
    if not differing:
        return
    said = []
    for key in differing[:SHOWN]:
        values: dict[str | None, list[int]] = {}
        for rank, theirs in enumerate(gathered):
            values.setdefault(theirs.get(key), []).append(rank)
        said.append(
            f"{key}: "
            + "; ".join(
                f"{value if value is not None else '(none)'} on {_ranks(r)}" for value, r in values.items()
            )
        )
    more = f" (and {len(differing) - SHOWN} more)" if len(differing) > SHOWN else ""
    raise PipelineError(
        f"compile was called with other arguments on different ranks{more}: " + " | ".join(said) + ". Every "
        "rank builds its stage from its own call, and rank 0 plans for all: give every rank the same model, "
        "optimizer, example input shapes and options (torchrun runs the same script on each)"
    )


def _ranks(ranks: list[int]) -> str:
    """``rank 3`` or ``ranks 0, 1, 2``."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
