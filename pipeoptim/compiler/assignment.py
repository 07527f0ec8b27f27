"""An assignment of graph nodes to stages (:class:`PartitionResult`), and the checks and
measures every partitioner shares."""

from __future__ import annotations

from dataclasses import dataclass

from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.grouping import Units
from pipeoptim.errors import PlanError
from pipeoptim.units import plural


@dataclass
class PartitionResult:
    """An assignment of nodes to stages and how it was found.

    Attributes:
        stage_of: stage of every node of the cost graph (same order as ``graph.nodes``).
        partitioner: ``"ilp"``, ``"uniform"``, ``"parameters"``, ``"balance_by_time"``,
            ``"chain_dp"`` or ``"brute_force"``.
        solver: ``"cbc"`` or ``"highs"`` for the ILP, :data:`IDEALS` for the dynamic program
            over ideals, else ``""``.
        status: solver status text (``"optimal"``, ``"optimal over N units"`` when the units
            are coarser than the nodes, ``"feasible (time limit)"``, ...).
        optimal: whether optimality (within the units) is proven.
        gap: relative MIP gap at the end (0 when optimal, ``None`` if unknown).
        solve_s: wall seconds spent.
        num_units: how many units the graph was placed as.
        recompute: per stage, whether it recomputes its activations; ``None``: where the
            memory limit binds (:func:`~pipeoptim.compiler.costmodel.evaluate`).
    """

    stage_of: list[int]
    partitioner: str
    solver: str = ""
    status: str = "optimal"
    optimal: bool = True
    gap: float | None = 0.0
    solve_s: float = 0.0
    num_units: int = 0
    recompute: list[bool] | None = None


def check_stages(units: Units, num_stages: int) -> None:
    """Raises PlanError: more stages than units that compute (``CostConfig`` refuses fewer
    than one)."""
    compute = sum(units.is_compute(u) for u in range(len(units)))
    if num_stages > compute:
        users = units.graph.users()
        held = [
            n.name
            for i, n in enumerate(units.graph.nodes)
            if n.mutates or (not n.sendable and n.op.startswith("call_") and users[i])
        ]
        why = (
            f" (in-place changes or values that cannot be sent hold the nodes from each one's "
            f"tensor to it in one stage: {', '.join(held[:3])}{' ...' if len(held) > 3 else ''})"
            if held
            else ""
        )
        most = plural(compute, "stage")
        raise PlanError(
            f"{plural(num_stages, 'stage')} requested but the graph has only {plural(compute, 'unit')} of "
            f"nodes that do work that a stage boundary may separate{why}; use at most {most} "
            f"(gpus={compute} in compile, --stages {compute} on the command line)"
        )


def peak_memory(graph: CostGraph, stage_of: list[int], config: CostConfig, recompute: str = "limit") -> int:
    """The largest stage memory in bytes, with the stages recomputing as ``recompute`` says
    (:func:`~pipeoptim.compiler.costmodel.evaluate`)."""
    return max(s.memory_bytes for s in evaluate(graph, stage_of, config, recompute))
