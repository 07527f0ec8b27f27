"""Checks of ``pipeoptim.compile``'s plain arguments, before anything else runs."""

from __future__ import annotations

import math
from collections.abc import Iterable

#: the ILP solvers :mod:`pipeoptim.compiler.ilp_solver` runs
SOLVERS = ("auto", "cbc", "highs")


def check_options(leaf_modules: Iterable[str], timeout: object, solver: object) -> None:
    """Refuse ``leaf_modules`` that is not a collection of names (a string alone was read
    letter by letter), a ``timeout`` that is not a positive finite number of seconds, and an
    unknown ``solver``.

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """
    if isinstance(leaf_modules, (str, bytes)) or not all(isinstance(n, str) for n in leaf_modules):
        raise ValueError(
            "leaf_modules must be a list of qualified module names as model.named_modules() gives "
            f"them (e.g. ['encoder.attn']), got {leaf_modules!r}"
        )
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(
            f"timeout must be a positive number of seconds (the longest wait between stages), got {timeout!r}"
        )
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, not {solver!r}")
