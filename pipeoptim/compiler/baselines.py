"""Contiguous splits of the normalised node order: the baseline partitioners and the chain DP.

:func:`uniform` (equal node counts), :func:`by_parameters` (DeepSpeed's ``parameters``
method), :func:`balance_by_time` (torchgpipe's ``balance_by_time``: balance compute only),
and :func:`chain_dp`, an exact dynamic program over contiguous splits with the full cost
model, which is optimal when the graph is a chain and serves as a test oracle.
:func:`brute_force` enumerates every assignment of tiny graphs.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np

from pipeoptim.compiler.assignment import PartitionResult, check_stages, peak_memory
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.grouping import Units, fine_units
from pipeoptim.compiler.milp import unit_stage_pin
from pipeoptim.compiler.saved_overlaps import excess, overlaps, prefixes
from pipeoptim.errors import InfeasibleMemoryError, PlanError
from pipeoptim.units import format_bytes


def _prefix(values: Sequence[float]) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])


def _cut_bytes(units: Units) -> np.ndarray:
    """Bytes (activation + gradient) crossing the cut before unit c, for c = 0..U."""
    diff = np.zeros(len(units) + 2)
    for p, readers in units.producers():
        node = units.graph.nodes[p]
        a, last = units.unit_of[p], max(readers)
        if last > a:
            diff[a + 1] += node.out_bytes + node.grad_bytes
            diff[last + 1] -= node.out_bytes + node.grad_bytes
    return np.cumsum(diff)[: len(units) + 1]


def _contiguous(
    units: Units,
    num_stages: int,
    stage_cost: Callable[[np.ndarray, int, int], np.ndarray],
) -> list[int] | None:
    """Exact min-max split of the unit order into ``num_stages`` contiguous non-empty stages.

    ``stage_cost(a, b, k)`` gives the cost of stage k covering units ``a[i]..b-1`` for an
    array of starts ``a`` (``inf`` where infeasible). Returns the unit stages or ``None``.
    """
    n_units = len(units)
    is_compute = _prefix([units.is_compute(u) for u in range(n_units)])
    pins = [unit_stage_pin(units, u, num_stages) for u in range(n_units)]
    inf = float("inf")
    best = np.full((num_stages + 1, n_units + 1), inf)
    arg = np.zeros((num_stages + 1, n_units + 1), dtype=int)
    best[0, 0] = 0.0
    starts = np.arange(n_units + 1)
    for k in range(num_stages):
        for b in range(1, n_units + 1):
            a = starts[:b]
            cost = np.maximum(best[k, :b], stage_cost(a, b, k))
            cost[is_compute[b] - is_compute[a] < 1] = inf  # every stage does work
            best[k + 1, b], arg[k + 1, b] = cost.min(), cost.argmin()
    if not np.isfinite(best[num_stages, n_units]):
        return None
    unit_stage = [0] * n_units
    b = n_units
    for k in range(num_stages, 0, -1):
        a = int(arg[k, b])
        for u in range(a, b):
            unit_stage[u] = k - 1
        b = a
    for u, pin in enumerate(pins):
        if pin is not None and unit_stage[u] != pin:
            return None
    return unit_stage


def chain_dp(
    graph: CostGraph,
    config: CostConfig,
    *,
    units: Units | None = None,
    strict: bool = True,
) -> PartitionResult | None:
    """Exact dynamic program over contiguous splits of the unit order, full cost model.

    Optimal among splits that keep the node order contiguous; on a chain (every node reads
    only its predecessor) that is every valid plan, so it is exact there.

    Returns ``None`` when no contiguous split meets the memory limit and ``strict`` is False.

    Raises:
        InfeasibleMemoryError: no contiguous split meets the memory limit (``strict``).
    """
    start = time.perf_counter()
    units = units if units is not None else fine_units(graph)
    check_stages(units, config.num_stages)
    n = config.num_stages
    t = _prefix([units.time(u, config) for u in range(len(units))])
    cut = _cut_bytes(units)
    cut[0] = cut[-1] = 0.0
    params = _prefix([units.attr(u, "param_bytes") for u in range(len(units))])
    buffers = _prefix([units.attr(u, "buffer_bytes") for u in range(len(units))])
    saved = _saved_between(units)
    limit = config.memory_limit

    def stage_cost(a: np.ndarray, b: int, k: int) -> np.ndarray:
        cost = (
            t[b]
            - t[a]
            + (params[b] - params[a]) * config.weight_s_per_byte(k)
            + config.comm_s(1.0) * (cut[a] + cut[b])
            + config.latency_at(k)
        )
        if limit is not None:
            mem = (
                (params[b] - params[a]) * config.weight_factor(k)
                + buffers[b]
                - buffers[a]
                + saved[a, b] * config.in_flight(k)
            )
            cost = np.where(mem <= limit, cost, np.inf)
        return cost

    unit_stage = _contiguous(units, n, stage_cost)
    if unit_stage is None:
        if not strict:
            return None
        least = min_contiguous_memory(units, config)
        raise InfeasibleMemoryError(
            f"no contiguous {n}-stage split fits in {format_bytes(limit or 0)}; the smallest "
            f"feasible limit is {format_bytes(least)}",
            limit_bytes=limit or 0,
            min_feasible_bytes=least,
        )
    return PartitionResult(
        stage_of=units.expand(unit_stage),
        partitioner="chain_dp",
        solve_s=time.perf_counter() - start,
        num_units=len(units),
    )


def min_contiguous_split(units: Units, config: CostConfig) -> list[int]:
    """Unit stages of the contiguous split with the smallest largest stage memory."""
    params = _prefix([units.attr(u, "param_bytes") for u in range(len(units))])
    buffers = _prefix([units.attr(u, "buffer_bytes") for u in range(len(units))])
    saved = _saved_between(units)

    def cost(a: np.ndarray, b: int, k: int) -> np.ndarray:
        return (
            (params[b] - params[a]) * config.weight_factor(k)
            + buffers[b]
            - buffers[a]
            + saved[a, b] * config.in_flight(k)
        )

    unit_stage = _contiguous(units, config.num_stages, cost)
    assert unit_stage is not None
    return unit_stage


def _saved_between(units: Units) -> np.ndarray:
    """``[a, b]``: bytes per micro-batch saved by a stage of units ``a`` to ``b - 1``, each
    storage once per stage holding it, as the cost model counts them
    (:mod:`pipeoptim.compiler.saved_overlaps`)."""
    saved = _prefix([units.attr(u, "saved_bytes") for u in range(len(units))])
    found, sets = overlaps(units), prefixes(units)
    extra = excess(found, sets, sets) if found else 0.0
    return saved[None, :] - saved[:, None] + extra


def min_contiguous_memory(units: Units, config: CostConfig) -> int:
    return peak_memory(units.graph, units.expand(min_contiguous_split(units, config)), config)


def _balanced(graph: CostGraph, config: CostConfig, weights: list[float], name: str) -> PartitionResult:
    start = time.perf_counter()
    units = fine_units(graph)
    check_stages(units, config.num_stages)
    w = _prefix([sum(weights[i] for i in m) for m in units.members])
    unit_stage = _contiguous(units, config.num_stages, lambda a, b, k: w[b] - w[a])
    assert unit_stage is not None
    return PartitionResult(
        stage_of=units.expand(unit_stage),
        partitioner=name,
        solve_s=time.perf_counter() - start,
        num_units=len(units),
    )


def uniform(graph: CostGraph, config: CostConfig) -> PartitionResult:
    """Contiguous split with (as nearly as possible) equal numbers of nodes that do work."""
    weights = [1.0 if n.time_s > 0 and n.op != "output" else 0.0 for n in graph.nodes]
    return _balanced(graph, config, weights, "uniform")


def by_parameters(graph: CostGraph, config: CostConfig) -> PartitionResult:
    """Contiguous split balancing parameter bytes (DeepSpeed's ``partition_method="parameters"``)."""
    return _balanced(graph, config, [float(n.param_bytes) for n in graph.nodes], "parameters")


def balance_by_time(graph: CostGraph, config: CostConfig) -> PartitionResult:
    """Contiguous split balancing compute time only, ignoring communication and memory.

    torchgpipe's ``balance_by_time`` profiles each layer and solves this block-partition
    problem heuristically; here it is solved exactly, so the baseline is at its best.
    """
    return _balanced(graph, config, [n.time_s for n in graph.nodes], "balance_by_time")


def brute_force(graph: CostGraph, config: CostConfig, *, units: Units | None = None) -> PartitionResult:
    """Try every assignment of units to stages (tiny graphs only: ``N ** units`` of them).

    Raises:
        PlanError: more than 200,000 assignments, or none is valid.
    """
    start = time.perf_counter()
    units = units if units is not None else fine_units(graph)
    n = config.num_stages
    check_stages(units, n)
    if n ** len(units) > 200_000:
        raise PlanError(f"brute force over {n}^{len(units)} assignments is too large")
    edges = sorted(units.edges())
    compute = [u for u in range(len(units)) if units.is_compute(u)]
    best, best_stage = float("inf"), None
    for assign in itertools.product(range(n), repeat=len(units)):
        if any(assign[a] > assign[b] for a, b in edges):
            continue
        if any(
            p is not None and assign[u] != p
            for u, p in ((u, unit_stage_pin(units, u, n)) for u in range(len(units)))
        ):
            continue
        if {assign[u] for u in compute} != set(range(n)):
            continue
        stats = evaluate(graph, units.expand(list(assign)), config)
        if config.memory_limit is not None and any(s.memory_bytes > config.memory_limit for s in stats):
            continue
        bottleneck = max(s.time_s for s in stats)
        if bottleneck < best:
            best, best_stage = bottleneck, list(assign)
    if best_stage is None:
        raise PlanError("no valid assignment exists")
    return PartitionResult(
        stage_of=units.expand(best_stage),
        partitioner="brute_force",
        solve_s=time.perf_counter() - start,
        num_units=len(units),
    )


BASELINES: dict[str, Callable[[CostGraph, CostConfig], PartitionResult]] = {
    "uniform": uniform,
    "parameters": by_parameters,
    "balance_by_time": balance_by_time,
}
