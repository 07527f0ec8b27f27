"""Bytes at stage boundaries: activations and gradients crossing each boundary, the inputs a
stage receives, and the activations a stage's nodes save (:mod:`pipeoptim.compiler.costmodel`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.shared import shared_parameters


def boundary_bytes(graph: CostGraph, stage_of: Sequence[int], num_stages: int) -> tuple[list[int], list[int]]:
    """Activation and gradient bytes crossing each boundary b = 0..N-2 (stage b to b+1);
    shared parameters (:mod:`pipeoptim.compiler.shared`) are held, not sent."""
    acts = [0] * max(num_stages - 1, 0)
    grads = [0] * max(num_stages - 1, 0)
    shared = shared_parameters(graph, stage_of)
    for p, readers in enumerate(graph.users()):
        if not readers or p in shared:
            continue
        last = max(stage_of[r] for r in readers)
        for b in range(stage_of[p], last):
            acts[b] += graph.nodes[p].out_bytes
            grads[b] += graph.nodes[p].grad_bytes
    return acts, grads


def saved_activation_bytes(nodes: Sequence[Any], held: Sequence[str] = ()) -> int:
    """Bytes a stage of these cost nodes saves per micro-batch: each saved storage once (a
    tensor saved by two of its nodes is held once; one saved in two stages is held by each,
    the later one keeping the copy it received), and a saved parameter the stage neither owns
    nor holds a copy of (``held``: its shared parameters) as an activation."""
    if not any(x.saved for x in nodes):
        return sum(x.saved_bytes for x in nodes)  # a profile without storage ids
    owned = {f"param:{name}" for x in nodes for name in x.params} | {f"param:{n}" for n in held}
    storages: dict[str, int] = {}
    for x in nodes:
        storages.update(x.saved)
    return sum(b for key, b in storages.items() if key not in owned)


def stage_input_bytes(graph: CostGraph, stage_of: Sequence[int], num_stages: int) -> list[int]:
    """Per stage, the bytes of the values it receives and reads itself (``I_k``), what a
    recomputing stage keeps per micro-batch: stage 0 the model inputs its nodes read, stage
    k > 0 the activations crossing boundary k-1 read by a node of stage k (not those it
    only passes on). Shared parameters (:mod:`pipeoptim.compiler.shared`) are held, not received."""
    result = [0] * num_stages
    shared = shared_parameters(graph, stage_of)
    for p, readers in enumerate(graph.users()):
        if p in shared:
            continue
        first = 0 if graph.nodes[p].op == "placeholder" else stage_of[p] + 1
        for k in {stage_of[r] for r in readers}:
            if k >= first:
                result[k] += graph.nodes[p].out_bytes
    return result
