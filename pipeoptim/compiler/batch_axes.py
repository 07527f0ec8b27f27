"""Sequence layers that would see the micro-batches cut across their sequences.

The pipeline splits a mini-batch into micro-batches along dim 0 of the model's inputs, and
each stage runs each micro-batch on its own. ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and
``nn.MultiheadAttention`` read their batch from dim 1 unless built with ``batch_first=True``
(torch's default is ``False``: ``[time, batch, features]``). A model fed time-first inputs
whose layer keeps that default trains in plain PyTorch, but pipelined each micro-batch held a
slice of the time steps of every sequence: the recurrence restarted from a zero state at each
slice, attention saw a part of each sequence, and the losses came out 4.3e-3 off plain
training without a word (helper-127).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from pipeoptim.compiler.trace import call_leaf
from pipeoptim.errors import ProfileError

#: the layers whose batch dimension follows ``batch_first``
SEQUENCE_LAYERS = (nn.RNNBase, nn.MultiheadAttention)


def _layer_and_input(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module | None, Any]:
    """The qualified name, module and first input of a node that runs a module (a
    ``call_module`` node, or a leaf with parameters, :func:`pipeoptim.compiler.trace.call_leaf`:
    its first argument fetches the module, its fourth holds the call's arguments)."""
    if node.op == "call_module":
        name = str(node.target)
        return name, gm.get_submodule(name), node.args[0] if node.args else None
    if node.op == "call_function" and node.target is call_leaf:
        fetch, _, _, args, _ = node.args
        name = str(fetch.target)
        return name, gm.get_submodule(name), args[0] if args else None
    return "", None, None


def check_batch_axes(
    gm: fx.GraphModule, dims: Mapping[str, list[int | None]], values: Mapping[fx.Node, Any]
) -> None:
    """Refuse a sequence layer (:data:`SEQUENCE_LAYERS`) whose first input carries the rows the
    pipeline splits along another dimension than the layer's batch: dim 0 with
    ``batch_first=True``, dim 1 without (on a 3-D input); an unbatched 2-D input has none.

    Args:
        gm: the traced graph.
        dims: per node name, the batch dimension of each output (``None``: none), from the
            profile's run at another batch size.
        values: per node, its output at the example inputs.

    Raises:
        ProfileError: naming the layer, the dimensions and the fix.
    """
    for node in gm.graph.nodes:
        name, layer, first = _layer_and_input(gm, node)
        if not isinstance(layer, SEQUENCE_LAYERS) or not isinstance(first, fx.Node):
            continue
        value, found = values.get(first), dims.get(first.name)
        if not isinstance(value, torch.Tensor) or not found or found[0] is None:
            continue
        axis = (0 if layer.batch_first else 1) if value.dim() == 3 else None
        if found[0] == axis:
            continue
        shape = list(value.shape)
        reads = (
            f"reads dim {axis} of its input {shape} as the batch (batch_first={layer.batch_first})"
            if axis is not None
            else f"reads its {value.dim()}-D input {shape} as one sequence, without a batch"
        )
        raise ProfileError(
            f"{name} ({type(layer).__name__}) {reads}, but the rows the pipeline splits into "
            f"micro-batches (dim 0 of the model's inputs) reach it along dim {found[0]}: each "
            "micro-batch would hold part of every sequence, not whole sequences. Fix: give the model "
            "batch-first inputs ([batch, time, ...]) and build the layer with batch_first=True, or "
            "transpose them before it (x.transpose(0, 1))"
        )
