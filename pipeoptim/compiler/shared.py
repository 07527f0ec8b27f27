"""Shared parameters: a trainable parameter read in several stages is held by each of them.

A parameter used by more than one stage (tied input and output embeddings, Press & Wolf 2017)
is not sent forward every micro-batch as an activation (for GPT-2's ``wte`` that would be
38.6 M values each way per micro-batch). Instead, as Megatron-LM's embedding group does
(Shoeybi et al. 2019; Narayanan et al., SC 2021, section 3), every stage that reads it holds a
copy, and the copies' gradients are summed once per mini-batch before the optimizer step
(:mod:`pipeoptim.runtime.shared`). The get_attr node of such a parameter is therefore never a
boundary value: codegen puts a copy of it in every stage that reads it.

The gradient sum is an all-gather of the holders' gradients added up in stage order (the same
sum, bit for bit, in every executor), so each of the ``h`` holders sends its ``B`` bytes to
``h - 1`` others and receives as many: ``(h - 1) · B`` each way per optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeoptim.compiler.costgraph import CostGraph


def is_parameter(node: Any) -> bool:
    """Whether a cost node is the get_attr of a trainable parameter (never a boundary value)."""
    return node.op == "get_attr" and node.param_bytes > 0


def shared_parameters(graph: CostGraph, stage_of: Sequence[int]) -> dict[int, list[int]]:
    """The trainable parameters not held only by the stage of their get_attr node.

    Args:
        graph: the cost graph.
        stage_of: stage of every node, in the order of ``graph.nodes``.

    Returns:
        ``{node index of the get_attr: sorted stages that read it}`` for every get_attr of a
        trainable parameter (``param_bytes > 0``) read in a stage other than its own.
    """
    shared = {}
    for i, readers in enumerate(graph.users()):
        if not is_parameter(graph.nodes[i]) or not readers:
            continue
        holders = sorted({stage_of[r] for r in readers})
        if holders != [stage_of[i]]:
            shared[i] = holders
    return shared


def reduce_bytes(param_bytes: int, holders: int) -> int:
    """Bytes each holder sends (and receives) per optimizer step to sum a shared parameter's
    gradient over ``holders`` copies by all-gather: ``(holders - 1) · param_bytes``."""
    return max(holders - 1, 0) * param_bytes
