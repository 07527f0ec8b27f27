"""Deferred batch normalisation: running statistics over the whole mini-batch.

A pipeline that splits a mini-batch into M micro-batches runs each ``BatchNorm`` layer on
one micro-batch at a time. By default (``batch_norm="micro-batch"``) each micro-batch is
normalised with its own statistics and updates the running statistics once, exactly as
gradient accumulation over the same micro-batches does: M updates per mini-batch, and
``num_batches_tracked`` counts micro-batches.

With ``batch_norm="deferred"`` (torchgpipe's ``DeferredBatchNorm``, Kim et al., arXiv:2004.09910,
§3.3) the normalisation is still per micro-batch, but the running statistics are updated once
per mini-batch, from the mean and variance of all its rows: the layer accumulates ``Σx`` and
``Σx²`` per channel over the micro-batches (in float64) and, when the stage steps its
optimizer, applies ``running ← (1 − m)·running + m·stat`` with the unbiased variance
``(Σx²/n − mean²)·n/(n − 1)``, as ``nn.BatchNorm`` does for one batch of n values per channel
(torchgpipe uses the biased one). The running statistics then equal those of training on
whole mini-batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BATCH_NORMS = ("micro-batch", "deferred")


class _Deferred:
    """Mixin over an ``nn.BatchNormNd`` (see the module docstring)."""

    _sum: torch.Tensor | None = None
    _sum_squares: torch.Tensor | None = None
    _rows = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn: Any = self
        if not (bn.training and bn.track_running_stats):
            return super().forward(input)  # type: ignore[misc]
        bn._check_input_dim(input)
        self._accumulate(input)
        return nn.functional.batch_norm(
            input, None, None, bn.weight, bn.bias, True, 0.0, bn.eps
        )  # normalised with the micro-batch's statistics, running statistics untouched

    # left out of a compiled stage's graph: its row count and sums change at every micro-batch,
    # and torch.compile, guarding on them, compiled again each time until its recompile limit,
    # then ran the stage eagerly from there on
    @torch.compiler.disable
    @torch.no_grad()
    def _accumulate(self, input: torch.Tensor) -> None:
        """Add the micro-batch's per-channel ``Σx`` and ``Σx²`` (float64) and its rows."""
        dims = [0, *range(2, input.dim())]
        x = input.detach().double()
        part, squares = x.sum(dims), (x * x).sum(dims)
        self._sum = part if self._sum is None else self._sum + part
        self._sum_squares = squares if self._sum_squares is None else self._sum_squares + squares
        self._rows += input.numel() // input.shape[1]

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the statistics of the mini-batch seen so far into the running statistics."""
        if not self._rows:
            return
        bn: Any = self
        assert self._sum is not None and self._sum_squares is not None
        n = self._rows
        mean = self._sum / n
        var = (self._sum_squares / n - mean * mean) * (n / max(n - 1, 1))
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype) * factor)
        bn.running_var.mul_(1 - factor).add_(var.to(bn.running_var.dtype) * factor)
        self._sum = self._sum_squares = None
        self._rows = 0


class DeferredBatchNorm1d(_Deferred, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with running statistics over the whole mini-batch."""


class DeferredBatchNorm2d(_Deferred, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with running statistics over the whole mini-batch."""


class DeferredBatchNorm3d(_Deferred, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with running statistics over the whole mini-batch."""


_DEFERRED: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: DeferredBatchNorm1d,
    nn.BatchNorm2d: DeferredBatchNorm2d,
    nn.BatchNorm3d: DeferredBatchNorm3d,
}
_PLAIN = {v: k for k, v in _DEFERRED.items()}


def defer_batch_norm(model: nn.Module) -> int:
    """Turn every ``nn.BatchNorm{1,2,3}d`` of ``model`` that tracks running statistics into
    its deferred form, in place (same parameters, buffers and ``state_dict`` keys).

    Returns:
        the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        deferred = _DEFERRED.get(type(module))
        if deferred is not None and module.track_running_stats:  # type: ignore[attr-defined]
            module.__class__ = deferred
            changed += 1
    return changed


def plain_batch_norm(model: nn.Module) -> nn.Module:
    """Undo :func:`defer_batch_norm` in place (statistics not yet committed are dropped);
    returns ``model``."""
    for module in model.modules():
        plain = _PLAIN.get(type(module))
        if plain is not None:
            for name in ("_sum", "_sum_squares", "_rows"):
                module.__dict__.pop(name, None)
            module.__class__ = plain
    return model


def commit_batch_norm(module: nn.Module) -> None:
    """Commit the mini-batch statistics of every deferred layer in ``module``."""
    for m in module.modules():
        if isinstance(m, _Deferred):
            m.commit()


def has_deferred(module: nn.Module) -> bool:
    return any(isinstance(m, _Deferred) for m in module.modules())
