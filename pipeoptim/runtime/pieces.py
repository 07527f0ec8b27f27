"""Flat pieces of a stage's long-lived tensors, cut once: :class:`FlatPieces`.

The SGD step with the prediction inside it (:mod:`pipeoptim.runtime.fused_step`) updates a
large parameter piece by piece, each piece's step and prediction while its weights, momentum
buffer, gradient and Ŵ are in the core's L2 cache. Cutting the pieces at every step cost a
view and an index per tensor and piece, a few microseconds each from Python, more than the
cache saved. Weights, momentum buffers and Ŵ buffers live as long as the stage, so their
pieces are cut once and kept; a gradient is new at every backward and is cut by one ``split``
per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

#: a parameter stepped in pieces: (the weights, their pieces), (its momentum buffer, its pieces),
#: (its gradient, its pieces); the i-th pieces of the three are the same flat elements
Cut = tuple[tuple[torch.Tensor, Sequence[torch.Tensor]], ...]


class PiecePlan(NamedTuple):
    """How each piece of a parameter's Ŵ is written once the step has updated the piece:
    ``hats[i] = W_i + alpha · first[i]``, then ``hats[i] += a · terms[i]`` for each ``(a, terms)``
    of ``rest`` (:func:`pipeoptim.runtime.extrapolation.extrapolate` on piece i, ``W_i`` the
    weights' piece i)."""

    hats: Sequence[torch.Tensor]
    alpha: float
    first: Sequence[torch.Tensor]
    rest: list[tuple[float, Sequence[torch.Tensor]]]


class FlatPieces:
    """Pieces of contiguous tensors that outlive a step, cut once and kept while each tensor
    keeps its data: the kept pieces still start at the tensor's address and it has the same
    number of elements and dtype. A tensor whose ``.data`` was replaced (even by a narrower or
    wider view from the same address, a view as another dtype, or a new tensor the allocator
    placed where a moved or freed storage was), or a new tensor, is cut again.

    Call :meth:`prune` after each step in pieces: pieces of tensors not asked for since the
    last prune are dropped (they would keep a replaced momentum buffer's memory alive; a step
    that steps every parameter whole keeps them for the next step in pieces, one step longer,
    and :meth:`clear` drops them all).
    """

    def __init__(self) -> None:
        #: id(tensor) -> (tensor, (elements, dtype, piece size), its pieces)
        self._pieces: dict[int, tuple[torch.Tensor, tuple, tuple[torch.Tensor, ...]]] = {}
        self._used: set[int] = set()

    def of(self, tensor: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
        """``tensor.view(-1).split(size)``, from the cut kept for ``tensor`` where there is one."""
        key = id(tensor)
        kept = self._pieces.get(key)
        data = (tensor.numel(), tensor.dtype, size)
        # the kept pieces' own address, not one noted when they were cut: a storage that moved
        # (resize_) or was freed takes its pieces with it, and a new tensor may take its place
        if (
            kept is None
            or kept[0] is not tensor
            or kept[1] != data
            or kept[2][0].data_ptr() != tensor.data_ptr()
        ):
            kept = (tensor, data, tensor.detach().view(-1).split(size))
            self._pieces[key] = kept
        self._used.add(key)
        return kept[2]

    def prune(self) -> None:
        """Drop the pieces not asked for since the last call."""
        self._pieces = {k: v for k, v in self._pieces.items() if k in self._used}
        self._used = set()

    def clear(self) -> None:
        """Drop every kept piece (the optimizer steps without pieces now)."""
        self._pieces, self._used = {}, set()
