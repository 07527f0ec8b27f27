"""What the prediction-error meter (:mod:`pipeoptim.runtime.staleness`) copies and compares.

:class:`CopyPool` keeps the copies of a stage's weights that a sampled micro-batch needed,
for the next sample: a copy made afresh at each sample took 2.5 ms for the benchmark MLP's
8 MiB stage inside a pipeline (its pages faulted in again after each free), against about
0.6 ms into a kept buffer. :func:`squared_distances` reads the weights a sample is
compared with once, tensor by tensor, for its error, its staleness and their norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CopyPool:
    """Copies of a list of tensors, into buffers kept from earlier copies where their shapes,
    dtypes and devices match (so at most as many sets exist as were ever in use at once)."""

    def __init__(self) -> None:
        self._free: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def copy(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A copy of ``tensors`` (detached), in a kept set of buffers where one fits."""
        while self._free:
            buffers = self._free.pop()
            if _fits(buffers, tensors):
                torch._foreach_copy_(buffers, [t.detach() for t in tensors])
                return buffers
        return [t.detach().clone() for t in tensors]

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        """Keep ``buffers`` (a set :meth:`copy` returned, no longer read) for a later copy."""
        self._free.append(buffers)


def _fits(buffers: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> bool:
    return len(buffers) == len(tensors) and all(
        b.shape == t.shape and b.dtype == t.dtype and b.device == t.device and b.stride() == t.stride()
        for b, t in zip(buffers, tensors)
    )


@torch.no_grad()
def squared_distances(
    others: Sequence[Sequence[torch.Tensor]], reference: Sequence[torch.Tensor]
) -> tuple[list[float], float]:
    """``‖a − reference‖²`` for each list ``a`` of ``others``, and ``‖reference‖²``, Euclidean
    over all tensors together: each tensor's norm in its own dtype (about 1e-7 relative in
    float32), the squares summed in float64 (float64 copies of the weights made a sample cost
    ~3x more). Tensor by tensor, each reference tensor is read while still in cache for all
    of its comparisons."""
    distances, norm = [0.0] * len(others), 0.0
    for index, y in enumerate(reference):
        norm += float(torch.linalg.vector_norm(y)) ** 2
        for j, a in enumerate(others):
            distances[j] += float(torch.linalg.vector_norm(a[index] - y)) ** 2
    return distances, norm
