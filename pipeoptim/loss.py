"""The loss of a mini-batch: a future (:class:`Loss`), completed from its micro-batch losses.

The last stage reports each micro-batch's loss ``loss_j``; the mini-batch's loss is
``Σ_j scale_j · loss_j`` (the scales of :mod:`pipeoptim.microbatch`), set on its future once
every micro-batch has reported (:class:`MiniBatchLosses`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

import torch

from pipeoptim.errors import PipelineError, PipeoptimError

T = TypeVar("T")


class Loss:
    """The loss of one mini-batch, known once the last stage has computed it.

    ``float(loss)``, ``loss.item()`` and ``loss.wait()`` block until then (and re-raise a
    failure of the pipeline); ``loss.done()`` does not block: it takes in what has arrived
    (``poller``; under torchrun the losses sent from the last stage) and says whether this
    one has. Losses complete in the order the mini-batches were given.
    """

    def __init__(
        self,
        index: int,
        waiter: Callable[[int], None] | None = None,
        poller: Callable[[], None] | None = None,
    ) -> None:
        self.index = index
        # a Python future: a failure's traceback holds frames whose ``self`` is the pipeline,
        # which holds this loss; the garbage collector frees that cycle, where it could not
        # see into a torch.futures.Future (a failed pipeline's memory, pipes and threads were
        # never released)
        self._future: Future[float] = Future()
        self._waiter, self._poller = waiter, poller

    def done(self) -> bool:
        if not self._future.done() and self._poller is not None:
            self._poller()
        return self._future.done()

    def wait(self) -> float:
        if not self._future.done() and self._waiter is not None:
            self._waiter(self.index)  # drives the receive that completes the future
        try:
            return float(self._future.result())
        except PipeoptimError as exc:
            exc.reported = True
            raise

    item = wait

    def __float__(self) -> float:
        return self.wait()

    def __repr__(self) -> str:
        if self.done():
            try:
                return f"Loss(mini_batch={self.index}, value={self.wait():.6g})"
            except Exception as exc:  # a failed future
                return f"Loss(mini_batch={self.index}, failed: {type(exc).__name__})"
        return f"Loss(mini_batch={self.index}, pending)"

    def _set(self, value: float) -> None:
        self._waiter = self._poller = None  # they hold the pipeline: a kept loss must not keep it alive
        self._future.set_result(value)

    def _fail(self, exc: BaseException) -> None:
        self._waiter = self._poller = None
        if not self._future.done():
            if not isinstance(exc, Exception):  # Ctrl-C's is the caller's, not this loss's
                stopped = PipelineError(
                    f"the pipeline was stopped by {type(exc).__name__} before this loss arrived"
                )
                stopped.__cause__ = exc
                exc = stopped
            self._future.set_exception(exc)


class MiniBatchLosses:
    """The pending :class:`Loss` of each mini-batch in flight, and its micro-batch losses so far.

    ``len()`` is the number of mini-batches whose loss is pending. Thread-safe: the process
    executor reports losses from its watcher thread.
    """

    def __init__(self, micro_batches: int, replicas: int = 1) -> None:
        self.micro_batches = micro_batches
        self.replicas = replicas
        self._pending: dict[int, list[tuple[int, float]]] = {}
        self._losses: dict[int, Loss] = {}
        self._scales: dict[int, list[float]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._losses)

    def expect(self, loss: Loss, scales: list[float]) -> None:
        """Register mini-batch ``loss.index``, split into ``len(scales)`` micro-batches."""
        with self._lock:
            self._losses[loss.index] = loss
            self._scales[loss.index] = scales

    def oldest(self) -> Loss | None:
        """The pending loss of the earliest mini-batch, or ``None`` when none is pending."""
        with self._lock:
            return self._losses[min(self._losses)] if self._losses else None

    def on_loss(self, micro_batch: int, value: torch.Tensor, replica: int = 0) -> None:
        """Record the loss of global micro-batch ``micro_batch`` (``mini_batch·M + j``) of
        ``replica`` (its ``j``-th of the mini-batch's ``R·m``, :mod:`pipeoptim.runtime.replicas`);
        the mini-batch's :class:`Loss` gets ``Σ_j scale_j · loss_j`` when its last one arrives."""
        mini, j = divmod(micro_batch, self.micro_batches)
        with self._lock:
            scales = self._scales.get(mini)
            if scales is None:  # its loss failed meanwhile (a failed or closed pipeline)
                return
            parts = self._pending.setdefault(mini, [])
            parts.append((replica * (len(scales) // self.replicas) + j, float(value)))
            if len(parts) < len(scales):
                return
            total = sum(v * scales[i] for i, v in sorted(parts))
            del self._pending[mini], self._scales[mini]
            loss = self._losses.pop(mini)
        loss._set(total)

    def fail_all(self, exc: BaseException) -> None:
        """Fail every pending loss with ``exc`` (a failed stage)."""
        with self._lock:
            losses = list(self._losses.values())
            self._losses.clear()
            self._pending.clear()
            self._scales.clear()
        for loss in losses:
            loss._fail(exc)


def drain(
    pending: deque[T], in_flight: int, everything: bool = False, loss_of: Callable[[T], Loss] = lambda e: e
) -> Iterator[T]:
    """The in-flight drain: pop and yield the oldest entries of ``pending`` (losses, or records
    holding one, read by ``loss_of``) while the oldest loss is done or more than ``in_flight``
    are pending; with ``everything``, all of them (after a flush). Callers wait on each loss
    in order, so losses are read in the order the mini-batches were given."""
    while pending and (everything or loss_of(pending[0]).done() or len(pending) > in_flight):
        yield pending.popleft()
