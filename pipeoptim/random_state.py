"""Compiling leaves the caller's random state as it was; Python's and NumPy's global generators.

Compiling draws random numbers where it measures (the optimizer's update cost on test tensors,
:mod:`pipeoptim.update_cost`), and only where no cached figure exists: under torchrun on some
ranks and not on others. A data loader shuffled with the global generator then gave the first
rank (which feeds the inputs) and the last (which reads the targets) different orders, and the
README's quick start trained on mismatched inputs and labels without an error (test accuracy
0.0976 on a first run, 0.74 once the figures were cached; helper-100).
"""

from __future__ import annotations

import contextlib
import functools
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def keeps_random_state(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` restoring, when it returns or raises, the state of torch's CPU generator and of
    the CUDA generators already in use when it was called (``torch.random.fork_rng``), and of
    Python's and NumPy's global generators (profiling runs a user's leaf modules, which may
    draw from them)."""

    @functools.wraps(fn)
    def kept(*args: P.args, **kwargs: P.kwargs) -> R:
        in_use = torch.cuda.is_initialized()
        states = python_random_states()
        try:
            with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if in_use else []):
                return fn(*args, **kwargs)
        finally:
            set_python_random_states(states)

    return kept


def python_random_states() -> tuple[Any, ...]:
    """The states of Python's global ``random`` generator and, where NumPy is imported, of its
    global ``np.random`` one (its key array as bytes, so that two states compare by value)."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return (random.getstate(),)
    kind, keys, *rest = numpy.random.get_state()
    return random.getstate(), (kind, keys.tobytes(), *rest)


def set_python_random_states(states: tuple[Any, ...]) -> None:
    """Put back what :func:`python_random_states` returned."""
    random.setstate(states[0])
    if len(states) > 1:
        kind, keys, *rest = states[1]
        numpy = sys.modules["numpy"]
        numpy.random.set_state((kind, numpy.frombuffer(keys, dtype=numpy.uint32), *rest))


@contextlib.contextmanager
def python_generators_seeded(value: int) -> Iterator[None]:
    """Within: Python's global ``random`` generator (and NumPy's ``np.random``, where NumPy is
    imported) seeded with ``value``; the caller's states put back after."""
    states = python_random_states()
    random.seed(value)
    if len(states) > 1:
        sys.modules["numpy"].random.seed(value % 2**32)
    try:
        yield
    finally:
        set_python_random_states(states)
