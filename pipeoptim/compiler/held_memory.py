"""The memory limit with every copy of a shared parameter counted.

A shared parameter (tied input and output embeddings, :mod:`pipeoptim.compiler.shared`) is
held by every stage that reads it: its weights, gradient, optimizer state and the method's
weight versions are in each holder's memory, and its update in each holder's time
(:func:`pipeoptim.compiler.costmodel.evaluate`). Where a graph has one, the partitioners get a
graph in which each parameter's bytes sit on every node reading it (:func:`params_at_readers`):
every holding stage counts the parameter at least once (more often where several of its
readers share a stage), so whatever meets the limit there meets it with the copies counted, and
the stage times count each holder's update. Counted once, at its get_attr node's stage (in its
first reader's unit), the update of the other holders was missing and the other readers were
ordered after the first (helper-129). :func:`fit_held_copies` checks the plan with the copies
counted, and lowers the limit by what a stage still exceeds (a parameter read by two nodes of
one stage counts twice there). Without shared parameters the partitioners count a stage's
memory as :func:`~pipeoptim.compiler.costmodel.evaluate` does
(:mod:`pipeoptim.compiler.saved_overlaps`): their plan is only checked (a baseline partitioner
ignores the limit), not planned again under a lower limit, which refused limits a plan meets,
naming a lower one (helper-136).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from pipeoptim.compiler.assignment import PartitionResult, peak_memory
from pipeoptim.compiler.baselines import BASELINES
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
    reader); the get_attr node keeps no bytes, neither output nor gradient: with its own it
    read as an activation crossing every cut before its last reader (gpt2's plan took 42.2 ms
    where 37.6 ms was possible; helper-131)."""
    nodes = list(graph.nodes)
    for i, readers in enumerate(graph.users()):
        node = graph.nodes[i]
        if not is_parameter(node) or not readers:
            continue
        # no value sent either; named, so that the units still know it for a parameter
        nodes[i] = replace(node, param_bytes=0, out_bytes=0, grad_bytes=0, params=node.params or [node.name])
        for r in readers:
            nodes[r] = replace(nodes[r], param_bytes=nodes[r].param_bytes + node.param_bytes)
    return replace(graph, nodes=nodes)


def fit_held_copies(
    graph: CostGraph, config: CostConfig, solve: Callable[[CostGraph, CostConfig], PartitionResult]
) -> PartitionResult:
    """``solve(graph, config)``; where a parameter is read by several nodes, of
    ``params_at_readers(graph)`` (module docstring), checked against ``config.memory_limit``
    (bytes per stage) with a copy of each shared parameter at every stage holding it and,
    where a stage is over it, solved again with the limit lowered by what its plan exceeds,
    :data:`ROUNDS` times at most.

    Raises:
        InfeasibleMemoryError: from ``solve``, or no plan found fits; with shared parameters,
            ``min_feasible_bytes`` is a limit a plan meets, copies counted (a smaller one may
            exist).
    """
    limit = config.memory_limit
    users = graph.users()
    tied = [n.name for i, n in enumerate(graph.nodes) if is_parameter(n) and len(users[i]) > 1]
    if not tied:
        result = solve(graph, config)
        peak = peak_memory(graph, result.stage_of, config) if limit is not None else 0
        if limit is not None and peak > limit:  # a baseline, which plans without the limit (helper-139)
            why = (
                f"{result.partitioner} plans without a memory limit; use the default partitioner "
                "(ilp), which meets it where any plan does, or raise --memory"
                if result.partitioner in BASELINES
                else "the planner's memory figures disagree with the cost model's (a bug: please "
                "report it with the model); raise --memory to at least that"
            )
            raise InfeasibleMemoryError(
                f"the {result.partitioner} plan needs {peak} bytes per stage, over the limit of "
                f"{limit}: {why}",
                limit_bytes=limit,
                min_feasible_bytes=peak,
            )
        return result
    planned = params_at_readers(graph)
    held = ", ".join(tied)
    lowered, peak = limit, 0
    for _ in range(ROUNDS):
        try:
            result = solve(planned, replace(config, memory_limit=lowered))
        except InfeasibleMemoryError as exc:
            raise InfeasibleMemoryError(
                f"no {config.num_stages}-stage plan found fits in {limit} bytes per stage with method "
                f"{config.method!r} and a copy of {held} at every stage that reads it; one fits in "
                f"{exc.min_feasible_bytes} bytes (found with a copy at every reading node: a smaller "
                f"limit may fit): {memory_fixes(config)}",
                limit_bytes=limit,
                min_feasible_bytes=exc.min_feasible_bytes,
            ) from exc
        if limit is None:
            return result
        peak = peak_memory(graph, result.stage_of, config)
        if peak <= limit:
            return result
        assert lowered is not None
        lowered -= peak - limit  # the partitioner's own memory figures differ from evaluate's
    raise InfeasibleMemoryError(
        f"no {config.num_stages}-stage plan found fits in {limit} bytes per stage with a copy of {held} "
        f"at every stage that reads it; the last one found needs {peak} bytes: raise --memory to at "
        "least that",
        limit_bytes=limit,
        min_feasible_bytes=peak,
    )
