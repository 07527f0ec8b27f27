"""Splitting a mini-batch into micro-batches, and how their losses add up to its loss.

A mini-batch of B rows is split along dim 0 into ``min(M, B)`` micro-batches
(``torch.tensor_split``: sizes differ by at most one), so a last mini-batch smaller than M
runs with fewer micro-batches instead of being refused.

The loss of the mini-batch is ``Σ_j scale_j · loss_j`` over its micro-batches, and the
backward of micro-batch j differentiates ``scale_j · loss_j`` (gradient accumulation,
Huang et al., GPipe, NeurIPS 2019, §2.2):

- ``loss_reduction="mean"``: ``loss_fn`` returns the mean over the rows it gets; then
  ``scale_j = n_j / B`` and the sum is the mean over the whole mini-batch.
- ``loss_reduction="sum"``: ``loss_fn`` returns the sum over its rows; ``scale_j = 1``.

A loss that is neither (normalised by a token count, or by a statistic of the batch) would
change with the micro-batch split: :class:`CheckedLoss` compares the loss of a micro-batch
with the losses of its two halves once and refuses such a loss, or a reduction declared
wrongly, with a :class:`~pipeoptim.errors.PipelineError`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pipeoptim.compiler.shapes import sequence_inputs
from pipeoptim.errors import PipelineError

REDUCTIONS = ("mean", "sum")


def split(value: Any, parts: int) -> list[Any]:
    """Split every tensor of ``value`` along dim 0 into ``parts`` (``torch.tensor_split``);
    other leaves are repeated in every part.

    Each part is a copy, not a view: a micro-batch that autograd saves (the input of a first
    convolution) then holds its own rows, not the storage of the whole mini-batch, as it would
    on a stage's device.
    """
    leaves, spec = pytree.tree_flatten(value)
    pieces = [
        [p.clone() for p in torch.tensor_split(x, parts)] if isinstance(x, torch.Tensor) else [x] * parts
        for x in leaves
    ]
    return [pytree.tree_unflatten([p[j] for p in pieces], spec) for j in range(parts)]


def count(batch: int, micro_batches: int) -> int:
    """Micro-batches a mini-batch of ``batch`` rows runs as: ``min(M, batch)``."""
    return max(1, min(micro_batches, batch))


class Rows(int):
    """Rows of a micro-batch (an ``int``) with its sequence length ``length`` (dim 1 of the
    inputs; ``None`` where the plan's lengths are fixed): what a stage needs to allocate the
    buffers it receives into (:func:`pipeoptim.runtime.comm.shape_for`)."""

    length: int | None

    def __new__(cls, rows: int, length: int | None = None) -> Rows:
        obj = super().__new__(cls, rows)
        obj.length = length
        return obj

    def __reduce__(self) -> tuple:
        return (Rows, (int(self), self.length))

    def __repr__(self) -> str:
        return f"Rows({int(self)}, length={self.length})"


def has_length(examples: Sequence[torch.Tensor], i: int) -> bool:
    """Whether example input ``i`` has the sequence dimension (dim 1 as long as the first's)."""
    mask = sequence_inputs(examples)
    return bool(mask and mask[i])


def same_shape(x: torch.Tensor, example: torch.Tensor, i: int, length: int | None) -> bool:
    """``x`` is shaped like example input ``i`` but for the batch and, where the plan has a
    dynamic sequence ``length`` (the longest, that of the example), a dim 1 up to it."""
    if x.dim() != example.dim() or tuple(x.shape[2:]) != tuple(example.shape[2:]):
        return False
    if x.dim() < 2 or x.shape[1] == example.shape[1]:
        return True
    return length is not None and example.shape[1] == length and 1 <= x.shape[1] <= length


def sizes(batch: int, parts: int) -> list[int]:
    """Rows of each of the ``parts`` micro-batches :func:`split` makes of ``batch`` rows."""
    return [batch // parts + (j < batch % parts) for j in range(parts)]


def scales(sizes: list[int], reduction: str) -> list[float]:
    """Loss factor of each micro-batch of ``sizes`` rows (see the module docstring)."""
    if reduction == "sum":
        return [1.0] * len(sizes)
    total = sum(sizes)
    return [n / total for n in sizes]


def declared_reduction(loss_fn: Callable[..., Any]) -> str | None:
    """The ``reduction`` a loss states itself: an ``nn`` loss module's ``.reduction`` or the
    ``reduction=`` keyword of a ``functools.partial``; ``None`` where it does not say."""
    if isinstance(loss_fn, functools.partial):
        return loss_fn.keywords.get("reduction")
    value = getattr(loss_fn, "reduction", None)
    return value if isinstance(value, str) else None


def check_reduction(loss_fn: Callable[..., Any], reduction: str) -> None:
    """Refuse an unknown ``reduction`` or one the loss contradicts.

    Raises:
        ValueError: ``reduction`` is not ``"mean"`` or ``"sum"``, or the loss says otherwise.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', not {reduction!r}")
    stated = declared_reduction(loss_fn)
    if stated is not None and stated != reduction:
        raise ValueError(
            f"loss_fn reduces with reduction={stated!r} but loss_reduction={reduction!r}: pass "
            f"loss_reduction={stated!r} to compile (a 'none' loss must be reduced to a scalar)"
            if stated in REDUCTIONS
            else f"loss_fn reduces with reduction={stated!r}; reduce it to a scalar mean or sum"
        )


class CheckedLoss:
    """``loss_fn`` that verifies, on its first call with at least two rows, that its value is the
    ``reduction`` of per-row values: it compares ``loss(rows)`` with ``loss`` of the two halves
    (``mean``: ``(n₁·l₁ + n₂·l₂)/n``; ``sum``: ``l₁ + l₂``), to ``rtol=1e-4``.

    The check is skipped where the model output's first tensor and the targets' first tensor do
    not share dim 0 (then dim 0 is not a batch dimension of both).

    Raises:
        PipelineError: (on that call) the loss matches the other reduction, or neither.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor], reduction: str) -> None:
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.checked = False

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        loss = self.loss_fn(output, targets)
        if not self.checked and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            rows = _rows(output, targets)
            if rows is not None and rows >= 2:
                self.checked = True
                with torch.no_grad():
                    self._check(float(loss), output, targets, rows)
        return loss

    def _check(self, whole: float, output: Any, targets: Any, rows: int) -> None:
        halves = list(zip(split(output, 2), split(targets, 2)))
        parts = [float(self.loss_fn(o, t)) for o, t in halves]
        sizes = [rows - rows // 2, rows // 2]
        as_mean = sum(n * v for n, v in zip(sizes, parts)) / rows
        as_sum = sum(parts)
        fits = {"mean": _close(whole, as_mean), "sum": _close(whole, as_sum)}
        if fits[self.reduction]:
            return
        other = "sum" if self.reduction == "mean" else "mean"
        if fits[other]:
            raise PipelineError(
                f"loss_fn returns the {other} over the rows of a micro-batch but the pipeline was "
                f"compiled with loss_reduction={self.reduction!r}: pass loss_reduction={other!r}"
            )
        raise PipelineError(
            f"loss_fn of {rows} rows ({whole:.6g}) is neither the mean ({as_mean:.6g}) nor the sum "
            f"({as_sum:.6g}) of its halves' losses, so splitting mini-batches into micro-batches "
            "would change it (e.g. a mean over a token count): make it a per-row mean or sum and "
            "pass loss_reduction, or use micro_batches=1"
        )


def _rows(output: Any, targets: Any) -> int | None:
    firsts = [
        next((x for x in pytree.tree_leaves(v) if isinstance(x, torch.Tensor) and x.dim() > 0), None)
        for v in (output, targets)
    ]
    if any(t is None for t in firsts) or firsts[0].shape[0] != firsts[1].shape[0]:
        return None
    return int(firsts[0].shape[0])


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
