"""The activation bytes an autograd graph holds for the backward, read off the graph itself
(what a stage reports per micro-batch; the profiler's per-node attribution is
:mod:`pipeoptim.compiler.saved_bytes`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeoptim.compiler.recompute import _Recompute
from pipeoptim.storage import storage_address, storage_bytes


def saved_bytes(outputs: Sequence[Any], exclude: set[int]) -> int:
    """Bytes of the tensors autograd saved to compute the gradients of ``outputs``.

    Walks the autograd graph and reads every node's ``_saved_*`` tensors, and the inputs a
    recomputed region (:class:`~pipeoptim.compiler.recompute._Recompute`: a user's checkpointing
    or a recomputing stage) keeps; storages in ``exclude`` (weights) and repeated storages are
    not counted.
    """
    seen_nodes: set[Any] = set()
    storages: dict[int, int] = {}
    stack = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        values = [getattr(node, name, None) for name in dir(node) if name.startswith("_saved_")]
        if isinstance(node, _Recompute._backward_cls):
            values.append(node.packed)
        for value in values:
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and (ptr := storage_address(t)) and ptr not in exclude:
                    storages[ptr] = storage_bytes(t)
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())
