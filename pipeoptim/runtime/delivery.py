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

from pipeoptim.runtime.grad_modes import callers_autocast_off
from pipeoptim.runtime.leaves import detach_values


def delivered(values: Any, device: torch.device | None = None) -> Any:
    """``values`` with every tensor replaced by a detached copy in fresh, contiguous memory
    (what a receive buffer holds after the transport), on ``device`` if given (one copy);
    other leaves unchanged. A sparse tensor (a target) is copied in its own layout."""

    def copy(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if v.layout != torch.strided:
            return v.detach().to(device or v.device, copy=True)
        return v.detach().to(device or v.device, memory_format=torch.contiguous_format, copy=True)

    return pytree.tree_map(copy, values)


@torch.no_grad()
@callers_autocast_off()
def forward_chain(modules: Sequence[torch.nn.Module], inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Evaluation-mode forward of ``inputs`` (as delivered to the first module) through the
    stage modules ``modules`` in order, each later module's inputs :func:`delivered` to it
    (restores the mode of each module and submodule: a submodule the user put in eval mode
    stays there)."""
    values: Any = inputs
    for i, module in enumerate(modules):
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            values = module(*(delivered(values) if i else values))
        finally:
            for m, training in modes:
                m.training = training
    return detach_values(values)
