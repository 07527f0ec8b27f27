"""Sequence length as a dynamic dimension: how every value's shape follows it.

The *sequence length* is dim 1 of the first input (``[batch, length, ...]`` token ids or
features); every input whose dim 1 equals it in the example varies with it. The graph is run
at two shorter lengths, ``L − 1`` and ``L − 2``; a tensor dimension whose size changes by the
same step ``k`` each time follows ``size(l) = size(L) + k·(l − L)`` (``k = 1`` for a
``[batch, length, d]`` activation and for both length dims of ``[batch, heads, length,
length]`` scores, ``k = d`` after flattening ``length × d``). With that, a stage that receives
a value allocates its buffer for any length ``l ≤ L`` without a shape handshake
(:func:`pipeoptim.runtime.layout.shape_for`), and a plan made for the longest sequence serves
shorter ones.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree


def sequence_inputs(inputs: Sequence[torch.Tensor]) -> list[bool] | None:
    """Which inputs have the sequence dimension (dim 1 equal to the first input's); ``None``
    where the first input has no dim 1."""
    if inputs[0].dim() < 2:
        return None
    length = inputs[0].shape[1]
    return [x.dim() >= 2 and x.shape[1] == length for x in inputs]


def with_length(inputs: Sequence[torch.Tensor], length: int) -> list[torch.Tensor]:
    """The inputs cut to ``length`` along the sequence dimension."""
    mask = sequence_inputs(inputs) or [False] * len(inputs)
    return [x[:, :length] if seq else x for x, seq in zip(inputs, mask)]


def length_slopes(
    gm: fx.GraphModule, inputs: Sequence[torch.Tensor], values: dict[fx.Node, Any], run: Any
) -> dict[str, list[list[int] | None]] | None:
    """Per node, for each flat output leaf, the step of each tensor dimension per unit of
    sequence length (``None`` for a leaf whose shape is not affine in the length).

    Args:
        gm: the graph.
        inputs: the example inputs (length L = dim 1 of the first).
        values: every node's output at length L.
        run: ``run(inputs) -> {node: output}``, the graph run at other inputs.

    Returns:
        ``None`` where there is no sequence dimension, ``L < 3``, or the graph does not run at
        a shorter length.
    """
    if sequence_inputs(inputs) is None or inputs[0].shape[1] < 3:
        return None
    length = int(inputs[0].shape[1])
    try:
        # torch.fx prints the traceback of a failing call into a GraphModule (e.g. one a
        # checkpointed function was traced into) to stderr before raising; the failure here is
        # expected and handled, so that print goes nowhere
        with contextlib.redirect_stderr(io.StringIO()):
            shorter = [run(with_length(inputs, length - k)) for k in (1, 2)]
    except Exception:
        return None
    result: dict[str, list[list[int] | None]] = {}
    for node, value in values.items():
        slopes: list[list[int] | None] = []
        others = [pytree.tree_leaves(env.get(node)) for env in shorter]
        for i, leaf in enumerate(pytree.tree_leaves(value)):
            if not isinstance(leaf, torch.Tensor):
                slopes.append(None)
                continue
            one, two = (o[i] if i < len(o) else None for o in others)
            slopes.append(_affine(leaf.shape, one, two))
        result[node.name] = slopes
    return result


def _affine(shape: torch.Size, one: Any, two: Any) -> list[int] | None:
    if not (isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor)):
        return None
    if not len(shape) == one.dim() == two.dim():
        return None
    steps = [a - b for a, b in zip(shape, one.shape)]
    if any(b - c != k for b, c, k in zip(one.shape, two.shape, steps)):
        return None
    return steps


def plan_length(plan: Any, example_inputs: Sequence[torch.Tensor], dynamic: bool) -> int | None:
    """The example's sequence length where shorter ones may be given: the graph runs at shorter
    lengths (``dynamic``, from the profile) and the shape of every tensor crossing a stage
    boundary of ``plan`` follows the length (see the module docstring); else ``None``."""
    if not dynamic or sequence_inputs(example_inputs) is None:
        return None
    for value in plan.values.values():
        for meta in value["meta"]:
            if meta["kind"] == "tensor" and meta.get("length") is None:
                return None
    return int(example_inputs[0].shape[1])


def plan_dynamic_length(plan: Any) -> bool:
    """Whether the graph of ``plan`` ran at shorter sequence lengths when it was profiled (its
    summary's ``dynamic_length``; a plan saved without it: whether its boundary values carry
    the length steps only such a profile records)."""
    if "dynamic_length" in plan.summary:
        return bool(plan.summary["dynamic_length"])
    return any("length" in meta for value in plan.values.values() for meta in value["meta"])
