"""The memory limit with every copy of a shared parameter counted.

A shared parameter (tied input and output embeddings, :mod:`pipeoptim.compiler.shared`) is
held by every stage that reads it: its weights, gradient, optimizer state and the method's
weight versions are in each holder's memory (:func:`pipeoptim.compiler.costmodel.evaluate`).
The partitioners' memory constraints count a parameter once, at its get_attr node's stage, so
the plan they return can put a holder over the limit. :func:`fit_held_copies` checks that plan
with the copies counted; where a stage is over, it partitions again a graph in which each
parameter's bytes sit on every node reading it instead (:func:`params_at_readers`): there every
holding stage counts the parameter at least once (more often where several of its readers
share a stage), so whatever meets the limit there meets it with the copies counted. The first
plan is optimal whenever it fits (its constraints are a relaxation); the second is
conservative, and may be slower than the best plan that fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from pipeoptim.compiler.assignment import PartitionResult, peak_memory
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.partition import memory_fixes
from pipeoptim.compiler.shared import is_parameter
from pipeoptim.errors import InfeasibleMemoryError

#: how often the second graph is partitioned, under a limit lowered by the excess each time
ROUNDS = 3


def params_at_readers(graph: CostGraph) -> CostGraph:
    """``graph`` with every trainable parameter's bytes moved from its get_attr node onto each
    node reading it (compute, update and memory then count it where it is held, once per
    reader)."""
    nodes = list(graph.nodes)
    for i, readers in enumerate(graph.users()):
        node = graph.nodes[i]
        if not is_parameter(node) or not readers:
            continue
        nodes[i] = replace(node, param_bytes=0)
        for r in readers:
            nodes[r] = replace(nodes[r], param_bytes=nodes[r].param_bytes + node.param_bytes)
    return replace(graph, nodes=nodes)


def fit_held_copies(
    graph: CostGraph, config: CostConfig, solve: Callable[[CostGraph, CostConfig], PartitionResult]
) -> PartitionResult:
    """``solve(graph, config)``, checked against ``config.memory_limit`` (bytes per stage) with
    a copy of each shared parameter at every stage holding it; where a stage is over it,
    ``solve(params_at_readers(graph), config)`` (module docstring), with the limit lowered by
    what its plan still exceeds (the partitioners' memory figures can differ from
    :func:`~pipeoptim.compiler.costmodel.evaluate`'s by a few activations), :data:`ROUNDS`
    times at most.

    Raises:
        InfeasibleMemoryError: from ``solve``, or no plan found fits; from the second graph on,
            ``min_feasible_bytes`` is a limit a plan meets, copies counted (a smaller one may
            exist).
    """
    limit = config.memory_limit
    users = graph.users()
    tied = [n.name for i, n in enumerate(graph.nodes) if is_parameter(n) and len(users[i]) > 1]
    try:
        result: PartitionResult | None = solve(graph, config)
    except InfeasibleMemoryError as exc:  # where each copy counts, another plan may need less
        if not tied:
            raise
        result, least = None, exc.min_feasible_bytes
    if result is not None:
        if limit is None or peak_memory(graph, result.stage_of, config) <= limit:
            return result
        least = None
    assert limit is not None
    held = ", ".join(tied) or "each parameter"
    readers, lowered = params_at_readers(graph), limit
    for _ in range(ROUNDS):
        try:
            result = solve(readers, replace(config, memory_limit=lowered))
        except InfeasibleMemoryError as exc:
            need = min(exc.min_feasible_bytes, least or exc.min_feasible_bytes)
            raise InfeasibleMemoryError(
                f"no {config.num_stages}-stage plan found fits in {limit} bytes per stage with method "
                f"{config.method!r} and a copy of {held} at every stage that reads it; one fits in {need} "
                f"bytes (found with a copy at every reading node: a smaller limit may fit): "
                f"{memory_fixes(config)}",
                limit_bytes=limit,
                min_feasible_bytes=need,
            ) from exc
        peak = peak_memory(graph, result.stage_of, config)
        if peak <= limit:
            return result
        lowered -= peak - limit  # the partitioner's own memory figures differ from evaluate's
    raise InfeasibleMemoryError(
        f"no {config.num_stages}-stage plan found fits in {limit} bytes per stage with a copy of {held} "
        f"at every stage that reads it; the last one found needs {peak} bytes: raise --memory to at "
        "least that",
        limit_bytes=limit,
        min_feasible_bytes=peak,
    )
