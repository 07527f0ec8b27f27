"""Streaming mini-batches through a pipeline, N in flight (a mixin of
:class:`pipeoptim.pipeline.Pipeline`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeoptim.loss import Loss


class Streaming:
    """:meth:`train`, over the pipeline's :meth:`step` and :meth:`flush`."""

    num_stages: int
    step: Callable[[Any, Any], Loss]
    flush: Callable[[], None]

    def train(
        self, batches: Iterable[tuple[Any, Any]], after_step: Callable[[], Any] | None = None
    ) -> Iterator[float]:
        """Stream ``(inputs, targets)`` mini-batches; yields each loss in order. N mini-batches
        are kept in flight, by count, not by which losses have arrived: when the loop stops
        after k losses, k + N mini-batches were given, with every executor (a flush or close
        finishes them). The pipeline is flushed at the end.

        Args:
            after_step: called after each mini-batch is given to :meth:`step`, e.g. a
                per-mini-batch ``scheduler.step``. Each loss is yielded N mini-batches after its
                mini-batch was given, so a scheduler stepped in the loop over the losses would
                give mini-batch t the rate of mini-batch t − N.
        """
        pending: deque[Loss] = deque()
        for inputs, targets in batches:
            pending.append(self.step(inputs, targets))
            if after_step is not None:
                after_step()
            while len(pending) > self.num_stages:
                yield pending.popleft().wait()
        self.flush()
        while pending:
            yield pending.popleft().wait()
