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

On the same sampled micro-batches the *staleness* ``‖W_cur − W_bwd‖ / ‖W_bwd‖`` is measured
too, ``W_cur`` being the stage's weights when the forward starts (what no correction would
have computed with): on one run's trajectory, a prediction helps where its error is below
the staleness.

Cost: the weights a sampled forward used are copied (one copy of the stage's weights) and
compared when its backward starts; micro-batches ``m`` with ``m % every == 0`` are sampled,
so at most ``⌈in-flight / every⌉`` copies exist at once (one when ``every`` ≥ N), two where
the forward does not use the current weights (one for the staleness). Where the weight policy
keeps the forward's weights until the backward anyway (weight stashing, 2BW, PipeOptim with
``backward="predicted"``) they are read there instead of copied. The copies' buffers are kept
for the next sample (:class:`pipeoptim.runtime.weight_copies.CopyPool`: the same peak memory,
without the page faults of fresh buffers). Where the schedule
takes no optimizer step between the forward and its backward (version difference 0: gpipe,
1f1b, the last stage) and the forward uses the parameters themselves (not 2BW's shadow),
nothing is copied: the parameters' autograd version counters are kept, and at the backward
unchanged counters prove both distances exactly 0 (copying the weights there cost 1F1B 7-14%
of its throughput on the benchmark MLP, to measure zeros). A tensor
changed in place despite that (a user's hook) drops the sample with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeoptim.runtime.weight_copies import CopyPool, squared_distances

if TYPE_CHECKING:
    from pipeoptim.runtime.weight_policy import WeightPolicy


@dataclass(frozen=True)
class PredictionError:
    """One stage's prediction error so far.

    Attributes:
        mean: mean of ``‖W_fwd − W_bwd‖ / ‖W_bwd‖`` over the sampled micro-batches whose
            backward has run (dimensionless); ``None`` before the first one or where the stage
            has no trainable parameter.
        samples: how many micro-batches the mean covers.
        staleness: mean of ``‖W_cur − W_bwd‖ / ‖W_bwd‖`` over the same micro-batches.
    """

    mean: float | None
    samples: int
    staleness: float | None


@dataclass(frozen=True)
class PipelineStats:
    """What :meth:`pipeoptim.Pipeline.stats` returns; every list has one entry per stage.

    Attributes:
        prediction_error: mean ``‖W_fwd − W_bwd‖ / ‖W_bwd‖`` (:class:`PredictionError`).
        prediction_error_samples: micro-batches each mean covers.
        staleness: mean ``‖W_cur − W_bwd‖ / ‖W_bwd‖`` on the same micro-batches, ``W_cur`` the
            weights current at the forward (what no correction would have used).
        peak_weight_versions: most versions of a weight held at once so far.
    """

    prediction_error: list[float | None]
    prediction_error_samples: list[int]
    staleness: list[float | None]
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
        #: sampled micro-batches: (copy of the weights their forward used, ``None`` where the policy
        #: keeps them; copy of the parameters then, ``None`` where the forward used those)
        self._forward: dict[int, tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]] = {}
        #: sampled micro-batches of version difference 0 whose forward uses the current
        #: parameters: (parameter, its version counter at the forward)
        self._unchanged: dict[int, list[tuple[torch.Tensor, int]]] = {}
        self._sum = 0.0
        self._stale_sum = 0.0
        self._samples = 0
        self._pool = CopyPool()

    def sampled(self, micro_batch: int) -> bool:
        """Whether ``micro_batch`` is measured (its forward is copied, its backward compared)."""
        return bool(self.every) and micro_batch % self.every == 0

    def forward(
        self,
        micro_batch: int,
        weights: Sequence[torch.Tensor],
        current: Sequence[torch.Tensor],
        version_diff: int,
        kept: bool = False,
    ) -> None:
        """Keep a copy of ``weights`` (the tensors the forward of ``micro_batch`` uses, in the
        stage's parameter order) and, where they differ, of ``current`` (the parameters now),
        if ``micro_batch`` is sampled; where ``weights`` are the parameters themselves and
        ``version_diff`` is 0 (no optimizer step before its backward), only their version
        counters (module docstring; 2BW's forward reads a shadow copy even then).

        Args:
            kept: the weight policy keeps the values of ``weights`` until this micro-batch's
                backward, which passes them to :meth:`backward` (weight stashing): they are
                not copied.
        """
        if not weights or not self.sampled(micro_batch):
            return
        same = all(w is c for w, c in zip(weights, current))
        if version_diff == 0 and same:
            self._unchanged[micro_batch] = [(t, t._version) for t in weights]
            return
        used = None if kept else self._pool.copy(weights)
        self._forward[micro_batch] = (used, None if same else self._pool.copy(current))

    def backward(
        self,
        micro_batch: int,
        current: Sequence[torch.Tensor],
        used: Callable[[], Sequence[torch.Tensor]] | None = None,
    ) -> None:
        """Compare the copies of ``micro_batch``'s forward, if sampled, with ``current`` (the
        stage's parameters as its backward starts, same order) and drop them.

        Args:
            used: the weights the forward used, kept by the weight policy (``kept`` at
                :meth:`forward`; called only then).
        """
        unchanged = self._unchanged.pop(micro_batch, None)
        if unchanged is not None:
            if all(t._version == v for t, v in unchanged) and all(
                w is c for (w, _), c in zip(unchanged, current)
            ):
                self._samples += 1  # the very tensors, unmodified: both distances are exactly 0
            else:
                warnings.warn(
                    f"prediction error: a weight changed in place between the forward and the "
                    f"backward of micro-batch {micro_batch} without an optimizer step in between "
                    "(a hook?); the sample is dropped",
                    stacklevel=2,
                )
            return
        copies = self._forward.pop(micro_batch, None)
        if copies is None:
            return
        copied, then = copies
        assert copied is not None or used is not None, "kept at the forward: the stage passes them"
        others = [copied if copied is not None else used(), *([] if then is None else [then])]
        distances, norm = squared_distances(others, current)
        error = _relative(distances[0], norm)
        self._sum += error
        self._stale_sum += error if then is None else _relative(distances[1], norm)
        self._samples += 1
        for buffers in (copied, then):
            if buffers is not None:
                self._pool.give_back(buffers)

    def result(self) -> PredictionError:
        """The means so far (:class:`PredictionError`)."""
        if not self._samples:
            return PredictionError(None, 0, None)
        return PredictionError(self._sum / self._samples, self._samples, self._stale_sum / self._samples)


def _relative(squared_distance: float, squared_norm: float) -> float:
    """``‖a − b‖ / ‖b‖`` from the squares; 0 where both are zero, infinite where only ``b`` is."""
    if squared_norm > 0:
        return (squared_distance / squared_norm) ** 0.5
    return 0.0 if squared_distance == 0 else float("inf")


def backward_weights(
    policy: WeightPolicy, trainable: Sequence[torch.Tensor], micro_batch: int
) -> list[torch.Tensor]:
    """The tensors the backward of ``micro_batch`` computes with (:meth:`WeightPolicy.backward_weight`),
    one per parameter of ``trainable``; a parameter the policy does not hold is itself."""
    names = {id(p): name for name, p in policy.params.items()}
    return [policy.backward_weight(names[id(p)], micro_batch) if id(p) in names else p for p in trainable]


def used_weights(policy: WeightPolicy | None, trainable: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors the forward being prepared computes with, one per parameter of ``trainable``
    (the stage's parameters in its optimizer's order): the policy's choice, else the parameter."""
    if policy is None:
        return list(trainable)
    used = {id(policy.params[name]): value for name, value in policy.forward_weights().items()}
    return [used.get(id(p), p) for p in trainable]
