"""Boundary values as the transport delivers them, for stages that run in one process.

A receiving stage of the distributed executors gets every tensor in a buffer of its own
with the plan's shape, contiguous strides and no storage offset (:mod:`pipeoptim.runtime.comm`
sends ``tensor.contiguous()`` into a fresh ``torch.empty``). CPU kernels round by layout:
attention's batched matmul of its scores with a transposed view of v, or a mean over the last
dimension of a transposed tensor, gives other bits than on the contiguous copy. So
the local executor, whose numbers must be those of the processes executor, hands each stage
the same layout (:func:`delivered`) instead of the sender's own tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree


def delivered(values: Any) -> Any:
    """``values`` with every tensor replaced by a detached copy in fresh, contiguous memory
    (what a receive buffer holds after the transport); other leaves unchanged."""

    def copy(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        return v.detach().clone(memory_format=torch.contiguous_format)

    return pytree.tree_map(copy, values)


@torch.no_grad()
def forward_chain(modules: Sequence[torch.nn.Module], inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Evaluation-mode forward of ``inputs`` through the stage modules ``modules`` in order,
    each stage's inputs :func:`delivered` to it (restores each module's mode)."""
    values: Any = delivered(inputs)
    for module in modules:
        was_training = module.training
        module.eval()
        try:
            values = delivered(module(*values))
        finally:
            module.train(was_training)
    return values
