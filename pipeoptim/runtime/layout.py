"""Where boundary values lie: their shapes from the plan at a micro-batch's size, and the
layout of the one message that carries a backward's gradients (:func:`grad_layout`).

Shapes and dtypes come from the plan (:attr:`pipeoptim.compiler.plan.Plan.values`), scaled
along the batch dimension by the micro-batch size (and along a sequence dimension by the
length, :mod:`pipeoptim.compiler.shapes`), so receivers allocate their buffers without a
shape handshake (:mod:`pipeoptim.runtime.comm`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from pipeoptim.compiler.plan import Plan


def leaf_metas(plan: Plan, names: Sequence[str]) -> list[dict[str, Any]]:
    """Metadata of the flat leaves of the values ``names``, in order."""
    return [meta for name in names for meta in plan.values[name]["meta"]]


def output_batch_dims(plan: Plan, gm: fx.GraphModule, static_batch: bool) -> list[int | None]:
    """The batch dimension of each of ``gm``'s flat outputs, as profiled (``None``: a value
    that does not grow with the batch, a constant of the graph included); 0 for every tensor
    of a model traced at a fixed batch size, whose profile could not tell (no input of the
    plan has a batch dimension then: a given plan does not say whether its model was)."""
    inputs = [m for name in plan.io[0].inputs for m in plan.values[name]["meta"] if m["kind"] == "tensor"]
    static_batch = static_batch or all(m.get("batch_dim") is None for m in inputs)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    dims: list[int | None] = []
    for value in pytree.tree_leaves(output.args[0]):
        if not isinstance(value, fx.Node):
            dims.append(None)
            continue
        for meta in plan.values[value.name]["meta"]:
            dims.append(0 if static_batch else meta.get("batch_dim"))
    return dims


def rebuild(plan: Plan, names: Sequence[str], leaves: Sequence[Any]) -> tuple[Any, ...]:
    """Turn flat leaves back into the values ``names`` (tuples and lists restored)."""
    values, i = [], 0
    for name in names:
        info = plan.values[name]
        count = len(info["meta"])
        part = list(leaves[i : i + count])
        i += count
        container = info.get("container", "")
        values.append(tuple(part) if container == "tuple" else part if container == "list" else part[0])
    return tuple(values)


def shape_for(meta: dict[str, Any], plan_batch: int, batch: int) -> list[int]:
    """The plan's shape of a tensor leaf at micro-batch size ``batch`` and, where ``batch`` is
    a :class:`pipeoptim.microbatch.Rows` with a length, at that sequence length
    (:mod:`pipeoptim.compiler.shapes`)."""
    shape = list(meta["shape"])
    length, follows = getattr(batch, "length", None), meta.get("length")
    if length is not None and follows is not None:
        shape = [s + k * (length - follows["at"]) for s, k in zip(shape, follows["slopes"])]
    dim = meta.get("batch_dim")
    if dim is not None and batch != plan_batch:
        shape[dim] = shape[dim] * batch // plan_batch
    return shape


_ALIGN = 16  # bytes: every gradient starts at a multiple (any dtype can view its slice)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def grad_layout(
    metas: Sequence[dict], mask: Sequence[bool], plan_batch: int, batch: int
) -> tuple[list[tuple[int, int, torch.dtype, list[int]]], int]:
    """Where the gradients of the masked leaves of ``metas`` lie in a backward message of a
    micro-batch of ``batch`` rows: ``([(leaf index, byte offset, dtype, shape)], total bytes)``.
    The message starts with one presence byte per masked leaf, in leaf order."""
    sent = [i for i, need in enumerate(mask) if need]
    offset, places = _aligned(len(sent)), []
    for i in sent:
        dtype = getattr(torch, metas[i]["dtype"])
        shape = shape_for(metas[i], plan_batch, batch)
        places.append((i, offset, dtype, shape))
        offset += _aligned(math.prod(shape) * dtype.itemsize)
    return places, offset
