"""Compiling leaves the caller's random state as it was.

Compiling draws random numbers where it measures (the optimizer's update cost on test tensors,
:mod:`pipeoptim.update_cost`), and only where no cached figure exists: under torchrun on some
ranks and not on others. A data loader shuffled with the global generator then gave the first
rank (which feeds the inputs) and the last (which reads the targets) different orders, and the
README's quick start trained on mismatched inputs and labels without an error (test accuracy
0.0976 on a first run, 0.74 once the figures were cached; helper-100).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def keeps_random_state(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` restoring, when it returns or raises, the state of torch's CPU generator and of
    the CUDA generators already in use when it was called (``torch.random.fork_rng``)."""

    @functools.wraps(fn)
    def kept(*args: P.args, **kwargs: P.kwargs) -> R:
        in_use = torch.cuda.is_initialized()
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if in_use else []):
            return fn(*args, **kwargs)

    return kept
