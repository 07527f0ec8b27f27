"""The faster of interchangeable ways to do one piece of work, chosen by timing them in turn.

Some work of the runtime can be done in ways that give the same bits and differ only in
speed, and which one is faster depends on the host: the SGD step with PipeOptim's prediction
inside it (:mod:`pipeoptim.runtime.fused_step`) in pieces of an eighth of the L2 cache took
0.86x the time of stepping and predicting parameter by parameter on the throughput
benchmark's 8 MiB stage on an Intel host, and 1.4-1.6x on an AMD EPYC whose 32 MiB L3 holds
the whole stage (4 MiB stage, 2026-12-04). :class:`TimedChoice` runs each option in turn
for the first calls and keeps the one of lowest median time from then on, as
``torch.backends.cudnn.benchmark`` picks a convolution algorithm by timing each.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from pipeoptim.compiler.profile import work_clock

T = TypeVar("T")
R = TypeVar("R")


class TimedChoice(Generic[T]):
    """Run work one of several ways: the first option for ``warmup`` untimed calls, then each
    option in turn until every one has been timed ``trials`` times, then always the one of
    lowest median time.

    Only for options that give the same results (the choice depends on timing, which differs
    from run to run and from rank to rank).

    Args:
        options: the ways, handed to the work as its argument; one option is taken without
            timing.
        trials: timed calls of each option before the choice.
        warmup: untimed calls first, with ``options[0]`` (work whose first call does more, such
            as a step that creates the optimizer's state).
        clock: seconds (default :func:`pipeoptim.compiler.profile.work_clock`, read at each
            call).

    Attributes:
        chosen: the option kept (``None`` until every option is timed; ``options[0]`` where
            there is one option).
        medians: median seconds of each option's trials, once chosen (empty before, and with
            one option).

    Raises:
        ValueError: no option, ``trials`` below 1, or ``warmup`` not an int of 0 or more.
    """

    def __init__(
        self,
        options: Sequence[T],
        trials: int = 8,
        clock: Callable[[], float] | None = None,
        warmup: int = 0,
    ) -> None:
        if not options:
            raise ValueError("TimedChoice needs at least one option")
        if trials < 1:
            raise ValueError(f"trials must be at least 1, not {trials}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a whole number of calls, 0 or more, not {warmup!r}")
        self.options = tuple(options)
        self.trials = trials
        self.clock = clock
        self._warmup = warmup
        self._times: list[list[float]] = [[] for _ in self.options]
        self._calls = 0
        self._decided = len(self.options) == 1
        self.chosen: T | None = self.options[0] if self._decided else None
        self.medians: tuple[float, ...] = ()

    def run(self, work: Callable[[T], R]) -> R:
        """``work(option)`` with the option chosen, or during the trials the next in turn,
        timed."""
        if self._decided:
            return work(self.chosen)  # type: ignore[arg-type]
        if self._warmup:
            self._warmup -= 1
            return work(self.options[0])
        index = self._calls % len(self.options)
        self._calls += 1
        clock = self.clock or work_clock()
        start = clock()
        result = work(self.options[index])
        self._times[index].append(clock() - start)
        if all(len(times) >= self.trials for times in self._times):
            self.medians = tuple(statistics.median(times) for times in self._times)
            self.chosen = self.options[self.medians.index(min(self.medians))]
            self._decided = True
        return result
