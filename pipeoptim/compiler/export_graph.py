"""Tracing by ``torch.export``, where ``torch.fx`` cannot trace the root module
(:func:`pipeoptim.compiler.trace.trace` falls back to it)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pipeoptim.compiler.shapes import sequence_inputs
from pipeoptim.compiler.trace_guards import refusing_custom_functions, refusing_hooks_and_draws


def _dynamic_dims(inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    """``torch.export`` hints: the batch dimension (dim 0) and the sequence length (dim 1 where
    it equals the first input's, :func:`pipeoptim.compiler.shapes.sequence_inputs`) are
    ``Dim.AUTO``: dynamic where the model allows, specialised (fixed) where it does not."""
    seq = sequence_inputs(inputs) or [False] * len(inputs)
    return tuple(
        {0: torch.export.Dim.AUTO, **({1: torch.export.Dim.AUTO} if s else {})} for x, s in zip(inputs, seq)
    )


def export_graph(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """``model`` traced by ``torch.export`` at ``inputs`` (batch and sequence dimensions
    dynamic, :func:`_dynamic_dims`) as a plain GraphModule; ``gm.meta["batch_rows"]`` holds
    :func:`_batch_rows`."""
    # torch logs the whole graph on a failed export; the caller reports the failure itself.
    names = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            refusing_custom_functions(),  # export would trace through them too
            refusing_hooks_and_draws(),  # and leave hooks out, and draw once
        ):
            exported = torch.export.export(model, inputs, strict=False, dynamic_shapes=_dynamic_dims(inputs))
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    module = exported.module()
    # ExportedProgram.module() forbids .train()/.eval(); a plain GraphModule allows them.
    gm = fx.GraphModule(module, module.graph, type(model).__name__)
    gm.meta["batch_rows"] = _batch_rows(exported)
    return gm


def _batch_rows(exported: torch.export.ExportedProgram) -> tuple[int, int | None] | None:
    """The batch sizes the exported graph is valid for, ``(least, most)`` (``most`` ``None``:
    no bound), where its forward narrowed them (``if x.shape[0] > 4``: export keeps the branch
    taken and guards ``rows >= 5``, a guard the pipeline's stages leave out); ``None`` where the
    batch dimension is fixed or only export's own floor of 2 rows holds (its 0/1 specialisation,
    not a branch of the model)."""
    first = next(
        (
            n
            for n in exported.graph.nodes
            if n.op == "placeholder"
            and n.name not in exported.graph_signature.inputs_to_parameters
            and n.name not in exported.graph_signature.inputs_to_buffers
        ),
        None,
    )
    value = None if first is None else first.meta.get("val")
    rows = None if value is None or value.dim() == 0 else value.shape[0]
    if not isinstance(rows, torch.SymInt):
        return None
    bounds = exported.range_constraints.get(rows.node.expr)
    if bounds is None:
        return None
    least = int(bounds.lower)
    most = None if bool(bounds.upper > sys.maxsize) else int(bounds.upper)  # int_oo: no bound
    return None if least <= 2 and most is None else (least, most)
