"""Checks of ``pipeoptim.compile``'s plain arguments, before anything else runs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from pipeoptim.compiler.ilp_solver import SOLVERS


def check_options(leaf_modules: Iterable[str], timeout: object, solver: object) -> tuple[str, ...]:
    """Refuse ``leaf_modules`` that is not a collection of names (a string alone was read
    letter by letter), a ``timeout`` that is not a positive finite number of seconds (numpy's
    numbers are numbers), and an unknown ``solver``. Returns ``leaf_modules`` as a tuple (a
    generator is read once, here).

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """
    names = None if isinstance(leaf_modules, (str, bytes)) else tuple(leaf_modules)
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(
            "leaf_modules must be a list of qualified module names as model.named_modules() gives "
            f"them (e.g. ['encoder.attn']), got {leaf_modules!r}"
        )
    if (
        not isinstance(timeout, numbers.Real)
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(
            f"timeout must be a positive number of seconds (the longest wait between stages), got {timeout!r}"
        )
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, not {solver!r}")
    return names
