"""Prediction error: how far the weights a forward used were from those its backward met.

For a micro-batch m at stage k, with ``W_fwd`` the stage's weights its forward computed
with (the current W for ``none``, ``pipedream``, ``gpipe`` and ``1f1b``; the prediction Ŵ for
``pipeoptim`` and ``spectrain``; the shadow ``W(t−1)`` for ``2bw``) and ``W_bwd`` the stage's
current weights when its backward starts (the weights its update is applied to), the
*prediction error* is

    e(m) = ‖W_fwd − W_bwd‖ / ‖W_bwd‖,

both norms Euclidean over all of the stage's trainable parameters together. It is 0 for the
synchronous schedules (no step comes between a forward and its backward); for ``none`` it is
the staleness of the forward, ``‖W(t−s) − W(t)‖ / ‖W(t)‖`` for version difference s; for
``pipedream`` the same number (the stash hides the difference from the backward, not from
the update, which is applied to ``W(t)``); for ``pipeoptim`` it is how well Ŵ predicted
``W(t)``. No paper defines it; it is this project's direct measure of prediction quality.

Cost: the weights a sampled forward used are copied (one clone of the stage's weights) and
compared when its backward starts; micro-batches ``m`` with ``m % every == 0`` are sampled,
so at most ``⌈in-flight / every⌉`` copies exist at once (one when ``every`` ≥ N).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PredictionError:
    """One stage's prediction error so far.

    Attributes:
        mean: mean of ``‖W_fwd − W_bwd‖ / ‖W_bwd‖`` over the sampled micro-batches whose
            backward has run (dimensionless); ``None`` before the first one or where the stage
            has no trainable parameter.
        samples: how many micro-batches the mean covers.
    """

    mean: float | None
    samples: int


@dataclass(frozen=True)
class PipelineStats:
    """What :meth:`pipeoptim.Pipeline.stats` returns; every list has one entry per stage.

    Attributes:
        prediction_error: mean ``‖W_fwd − W_bwd‖ / ‖W_bwd‖`` (:class:`PredictionError`).
        prediction_error_samples: micro-batches each mean covers.
        peak_weight_versions: most versions of a weight held at once so far.
    """

    prediction_error: list[float | None]
    prediction_error_samples: list[int]
    peak_weight_versions: list[int]


class PredictionErrorMeter:
    """Samples one micro-batch in ``every`` and averages its prediction error (module docstring).

    Args:
        every: sample the micro-batches whose index is a multiple of ``every``; 0 measures
            nothing.

    Raises:
        ValueError: ``every`` is negative.
    """

    def __init__(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"prediction_error_every must be 0 (off) or positive, got {every}")
        self.every = every
        self._forward: dict[int, list[torch.Tensor]] = {}
        self._sum = 0.0
        self._samples = 0

    def forward(self, micro_batch: int, weights: Sequence[torch.Tensor]) -> None:
        """Keep a copy of ``weights`` (the tensors the forward of ``micro_batch`` uses, in the
        stage's parameter order) if ``micro_batch`` is sampled."""
        if not self.every or not weights or micro_batch % self.every:
            return
        with torch.no_grad():
            self._forward[micro_batch] = [w.detach().clone() for w in weights]

    def backward(self, micro_batch: int, current: Sequence[torch.Tensor]) -> None:
        """Compare the copy of ``micro_batch``'s forward weights, if sampled, with ``current``
        (the stage's parameters as its backward starts, same order) and drop the copy."""
        used = self._forward.pop(micro_batch, None)
        if used is None:
            return
        with torch.no_grad():
            diff = sum(float(torch.sum((u.double() - c.double()) ** 2)) for u, c in zip(used, current))
            norm = sum(float(torch.sum(c.double() ** 2)) for c in current)
        self._sum += (diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))
        self._samples += 1

    def result(self) -> PredictionError:
        """The mean so far (:class:`PredictionError`)."""
        return PredictionError(self._sum / self._samples if self._samples else None, self._samples)
