"""Flat leaves of the values a stage receives and sends, on the path of every action.

A boundary value is almost always a tuple of tensors or one tensor; :func:`flatten` and
:func:`detach_values` take it without ``torch.utils._pytree``'s tree walk, which cost a stage
of the benchmark MLP 10-15 µs per call right after its forward (cold caches), three calls per
forward, and fall back to the tree walk for every other structure (nested containers, numbers,
dicts), so both give exactly what the tree walk gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree


def _tensors(values: Any) -> bool:
    """Whether ``values`` is a plain tuple whose items are all tensors."""
    return type(values) is tuple and all(isinstance(v, torch.Tensor) for v in values)


def flatten(values: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The leaves of ``values`` (``pytree.tree_flatten`` order) and the function that builds
    the same structure around new leaves."""
    if _tensors(values):
        return list(values), tuple
    if type(values) is torch.Tensor:  # a stage of one output (a Sequential's): one leaf
        return [values], _only
    leaves, spec = pytree.tree_flatten(values)
    return leaves, lambda new: pytree.tree_unflatten(new, spec)


def _only(new: list[Any]) -> Any:
    return new[0]


def detach_values(values: Any) -> Any:
    """The same structure with every tensor detached."""
    if _tensors(values):
        return tuple(v.detach() for v in values)
    return pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, values)
