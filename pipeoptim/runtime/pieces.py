"""Flat pieces of a stage's long-lived tensors, cut once: :class:`FlatPieces` and :class:`Piece`.

The SGD step with the prediction inside it (:mod:`pipeoptim.runtime.fused_step`) updates a
large parameter piece by piece, each piece's step and prediction while its weights, momentum
buffer, gradient and Ŵ are in the core's L2 cache. Cutting the pieces at every step cost a
view and an index per tensor and piece, a few microseconds each from Python, more than the
cache saved. Weights, momentum buffers and Ŵ buffers live as long as the stage, so their
pieces are cut once and kept; a gradient is new at every backward and is cut by one ``split``
per step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Piece(NamedTuple):
    """One piece of a parameter that :func:`pipeoptim.runtime.fused_step.sgd_step_each` has
    just updated; the pieces of a parameter come in order, ``index`` 0 first.

    Attributes:
        index: the piece's place among the parameter's pieces.
        size: elements of every piece of the parameter but the last (which may be shorter).
        views: the piece of the parameter, of its momentum buffer and of its gradient.
        addresses: the data addresses of those three whole tensors (:meth:`place_of`).
    """

    index: int
    size: int
    views: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    addresses: tuple[int, int, int]

    @property
    def span(self) -> slice:
        """The piece's flat elements, ``param.view(-1)[span]``."""
        start = self.index * self.size
        return slice(start, start + self.views[0].numel())

    def place_of(self, tensor: torch.Tensor) -> int | None:
        """Which of :attr:`views` is the piece of ``tensor`` (``None``: another tensor)."""
        address, (weights, momentum, grad) = tensor.data_ptr(), self.addresses
        return 0 if address == weights else 1 if address == momentum else 2 if address == grad else None

    def view_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The piece of ``tensor`` (a contiguous tensor shaped like the parameter)."""
        place = self.place_of(tensor)
        return self.views[place] if place is not None else tensor.view(-1)[self.span]


class FlatPieces:
    """Pieces of contiguous tensors that outlive a step, cut once and kept while each tensor
    keeps its data (a tensor whose ``.data`` was replaced, or a new tensor, is cut again).

    Call :meth:`prune` after each step: pieces of tensors not asked for since the last prune
    are dropped (they would keep a replaced momentum buffer's memory alive).
    """

    def __init__(self) -> None:
        self._pieces: dict[int, tuple[torch.Tensor, int, int, tuple[torch.Tensor, ...]]] = {}
        self._used: set[int] = set()

    def of(self, tensor: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
        """``tensor.view(-1).split(size)``, from the cut kept for ``tensor`` where there is one."""
        key = id(tensor)
        kept = self._pieces.get(key)
        if kept is None or kept[0] is not tensor or kept[1] != tensor.data_ptr() or kept[2] != size:
            kept = (tensor, tensor.data_ptr(), size, tensor.detach().view(-1).split(size))
            self._pieces[key] = kept
        self._used.add(key)
        return kept[3]

    def prune(self) -> None:
        """Drop the pieces not asked for since the last call."""
        self._pieces = {k: v for k, v in self._pieces.items() if k in self._used}
        self._used = set()
