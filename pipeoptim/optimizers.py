"""The optimizers and the learning-rate schedule of ``pipeoptim train`` (:mod:`pipeoptim.training`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")


def default_weight_decay(name: str) -> float:
    """``torch.optim``'s own default weight decay of optimizer ``name``: 0.01 for AdamW (its
    decoupled decay is what sets it apart from Adam), 0 for the others."""
    return 0.01 if name == "adamw" else 0.0


def make_optimizer(
    name: str, params: Any, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``sgd`` (with ``momentum``), ``adam``, ``adamw``, ``rmsprop`` or ``adagrad``.

    Raises:
        ValueError: unknown name.
    """
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def cosine_factor(total: int) -> Callable[[int], float]:
    """Cosine annealing to zero over ``total`` mini-batches (Loshchilov & Hutter, SGDR, ICLR 2017,
    eq. 5 with one cycle and η_min = 0) as a factor on the base learning rate: a closed form of
    the step alone, so a resumed run with more epochs follows the longer schedule."""

    def factor(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))

    return factor
