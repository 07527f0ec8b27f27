"""Partition: assign graph nodes to pipeline stages.

The main partitioner, :func:`ilp`, is exact over the :mod:`pipeoptim.compiler.units` of a
cost graph: the dynamic program over ideals of :mod:`pipeoptim.compiler.ideals` where the
units have few enough of them, else an integer linear program (PuLP, solved by HiGHS or
CBC). The ILP uses the *cumulative* formulation: binary ``z[u, s] = 1`` iff unit u is in a
stage ``<= s`` (so ``{u : z[u, s] = 1}`` is the ideal ending stage s; built in
:mod:`pipeoptim.compiler.milp`). Then

- ``z[u, s] <= z[u, s+1]`` (a unit is in exactly one stage);
- ``z[v, s] <= z[u, s]`` for every edge u -> v (edges never run backwards);
- ``x[u, s] = z[u, s] - z[u, s-1]`` is 1 iff u is in stage s;
- ``c[p, s] >= z[u, s] - z[v, s]`` for a value produced in unit u and read in unit v:
  it crosses boundary s (counted on every boundary it crosses);
- stage time ``T_s`` and memory ``M_s`` are linear in ``x`` and ``c`` (see
  :mod:`pipeoptim.compiler.costmodel`); ``T >= T_s``, ``M_s <= limit``; minimise ``T``.

The assignment formulation (``x[u, s]`` with ``stage(u) <= stage(v)``) is much slower to
solve; the cumulative one keeps the LP relaxation tighter (see ``../shared/PITFALLS.md``).
A known plan's bottleneck bounds ``T`` from above and confines every unit to a window of
stages (:func:`~pipeoptim.compiler.milp.stage_windows`), which fixes most binaries. The
relaxation stays weak where communication dominates (ResNet-101 in 16 stages: LP bound
10.9 ms against the optimum 19.8 ms), which is what the dynamic program over ideals avoids.

Baselines for comparison, all contiguous splits of the normalised node order:
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
from dataclasses import dataclass, replace

import numpy as np

from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.ideals import enumerate_ideals, ideal_dp
from pipeoptim.compiler.milp import build_ilp, resolve_solver, solve_ilp, stage_from_z, unit_stage_pin
from pipeoptim.compiler.units import Units, coarsen, fine_units
from pipeoptim.errors import InfeasibleMemoryError, PlanError
from pipeoptim.units import format_bytes


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
    """

    stage_of: list[int]
    partitioner: str
    solver: str = ""
    status: str = "optimal"
    optimal: bool = True
    gap: float | None = 0.0
    solve_s: float = 0.0
    num_units: int = 0


def _check_stages(units: Units, num_stages: int) -> None:
    if num_stages < 1:
        raise PlanError(f"the number of stages must be at least 1, got {num_stages}")
    compute = sum(units.is_compute(u) for u in range(len(units)))
    if num_stages > compute:
        raise PlanError(
            f"{num_stages} stages requested but the graph has only {compute} node(s) that do "
            f"work; use at most {compute} stages (--gpus {compute})"
        )


def _peak_memory(graph: CostGraph, stage_of: list[int], config: CostConfig) -> int:
    return max(s.memory_bytes for s in evaluate(graph, stage_of, config))


def _unit_stages(stage_of: list[int], units: Units) -> list[int]:
    unit_stage = [stage_of[m[0]] for m in units.members]
    assert units.expand(unit_stage) == stage_of, "a known plan must stay representable in the units"
    return unit_stage


def ilp(
    graph: CostGraph,
    config: CostConfig,
    *,
    solver: str = "auto",
    time_limit: float = 30.0,
    max_units: int = 64,
    gap: float = 1e-4,
    units: Units | None = None,
    ideals: bool = True,
) -> PartitionResult:
    """The plan with the smallest bottleneck stage time: exact over the units.

    First the exact dynamic program over ideals (:mod:`pipeoptim.compiler.ideals`) on the
    finest units with at most :data:`~pipeoptim.compiler.ideals.MAX_IDEALS` ideals (the nodes
    themselves, or the graph coarsened to 256, 128 or ``max_units`` units); where every
    level has more, the ILP described in the module docstring. The exact contiguous split
    (:func:`chain_dp`) at node level, or under a memory limit it cannot meet the plan of
    :func:`min_memory_plan`, stays representable after coarsening, warm-starts the solver and
    bounds the bottleneck (:func:`~pipeoptim.compiler.milp.stage_windows`), so the result is
    never worse than any contiguous baseline.

    Args:
        graph: the cost graph.
        config: stages, method, bandwidth, memory limit.
        solver: ``"auto"`` (HiGHS if ``highspy`` is installed, else CBC), ``"cbc"`` (bundled
            with PuLP) or ``"highs"``.
        time_limit: seconds the solver may use; after it the best plan found is returned
            with ``optimal=False`` and its gap.
        max_units: coarsen the graph to at most this many units for the ILP; the status
            says ``"optimal over N units"`` when the units are coarser than the nodes (a
            finer plan may be better).
        gap: relative MIP gap at which the solver stops and reports ``optimal``.
        units: use this grouping instead (no coarsening).
        ideals: try the dynamic program over ideals first (``False``: the ILP only).

    Raises:
        PlanError: more stages than nodes that do work, or unknown solver.
        InfeasibleMemoryError: no plan over the units meets ``config.memory_limit``; the error
            carries the smallest limit one meets (:func:`min_memory_plan`).
    """
    start = time.perf_counter()
    solver = resolve_solver(solver)
    n = config.num_stages
    fine = fine_units(graph) if units is None else units
    _check_stages(fine, n)
    n_fine = len(fine_units(graph)) if units is not None else len(fine)
    warm = chain_dp(graph, config, units=fine, strict=False)
    warm_plan = warm.stage_of if warm is not None else None
    if ideals:
        keep = _base_starts(graph, config, fine) | frozenset(
            _stage_starts(warm_plan, fine) if warm_plan else ()
        )
        exact = _exact_units(fine, n, keep, max_units, coarsen_them=units is None)
        if exact is not None:
            chosen, ideal_sets = exact
            found = ideal_dp(chosen, ideal_sets, config, "time", memory_limit=config.memory_limit)
            if found is None:
                # Then no contiguous split fits either (its starts would be kept), ``keep`` is
                # _base_starts, and min_memory_plan works on these very units.
                least = min_memory_plan(graph, config, solver=solver, max_units=max_units, units=units)
                assert least.memory_bytes > (config.memory_limit or 0), "the same units cannot fit"
                raise _memory_error(config, least)
            return PartitionResult(
                stage_of=chosen.expand(found[0]),
                partitioner="ilp",
                solver=IDEALS,
                status="optimal" if len(chosen) == n_fine else f"optimal over {len(chosen)} units",
                optimal=True,
                gap=0.0,
                solve_s=time.perf_counter() - start,
                num_units=len(chosen),
            )
    if warm_plan is None:  # only a memory limit can leave no contiguous split
        least = min_memory_plan(
            graph,
            config,
            solver=solver,
            time_limit=time_limit,
            max_units=max_units,
            units=units,
            ideals=False,
        )
        if least.memory_bytes > (config.memory_limit or 0):
            raise _memory_error(config, least)
        warm_plan = least.stage_of
    if units is None:
        units = coarsen(fine, max_units, n, keep_starts=frozenset(_stage_starts(warm_plan, fine)))
    upper = max(s.time_s for s in evaluate(graph, warm_plan, config))
    stage_of, status, optimal, final_gap = _solve_time(
        graph, config, units, warm_plan, upper, solver, time_limit, gap
    )
    if status.startswith("optimal") and len(units) < n_fine:
        status = f"optimal over {len(units)} units"
    return PartitionResult(
        stage_of=stage_of,
        partitioner="ilp",
        solver=solver,
        status=status,
        optimal=optimal,
        gap=final_gap,
        solve_s=time.perf_counter() - start,
        num_units=len(units),
    )


#: :attr:`PartitionResult.solver` of plans found by the dynamic program over ideals.
IDEALS = "dp over ideals"


def _base_starts(graph: CostGraph, config: CostConfig, fine: Units) -> frozenset[int]:
    """Stage starts that do not depend on the memory limit: those of the fastest contiguous
    split without a limit and of the contiguous split with the least memory."""
    fastest = chain_dp(graph, replace(config, memory_limit=None), units=fine)
    assert fastest is not None
    least = fine.expand(_min_contiguous_split(fine, config))
    return frozenset(_stage_starts(fastest.stage_of, fine)) | frozenset(_stage_starts(least, fine))


def _exact_units(
    fine: Units, n: int, keep: frozenset[int], max_units: int, coarsen_them: bool
) -> tuple[Units, np.ndarray] | None:
    """The finest of the units, and the graph coarsened to 256, 128 and ``max_units`` units
    (keeping ``keep``), with few enough ideals for :func:`ideal_dp`; and its ideals."""
    sizes = sorted({m for m in (256, 128, max_units) if m < len(fine)}, reverse=True) if coarsen_them else []
    for size in [len(fine), *sizes]:
        units = fine if size == len(fine) else coarsen(fine, size, n, keep_starts=keep)
        ideal_sets = enumerate_ideals(units)
        if ideal_sets is not None:
            return units, ideal_sets
    return None


def _solve_time(
    graph: CostGraph,
    config: CostConfig,
    units: Units,
    warm_plan: list[int],
    upper: float,
    solver: str,
    time_limit: float,
    gap: float,
) -> tuple[list[int], str, bool, float | None]:
    """Solve the time ILP; return (plan, status, optimal, gap).

    The solver checks the memory limit in MiB within its feasibility tolerance; a plan that
    breaks the exact byte limit is cut off by solving again with the limit lowered by the
    excess (twice at most), after which the warm start, which fits, is returned as it is.
    """
    limit = config.memory_limit
    for _ in range(3):
        built = build_ilp(units, config, "time", upper_s=upper, memory_limit=limit)
        built.warm_start(_unit_stages(warm_plan, units))
        status, optimal, final_gap = solve_ilp(built.prob, solver, time_limit, True, gap)
        if not status.startswith(("optimal", "feasible")):
            break
        stage_of = units.expand([stage_from_z(built.z, u, config.num_stages) for u in range(len(units))])
        if config.memory_limit is None or limit is None:
            return stage_of, status, optimal, final_gap
        excess = _peak_memory(graph, stage_of, config) - config.memory_limit
        if excess <= 0:
            return stage_of, status, optimal, final_gap
        limit -= excess + 1
    return warm_plan, f"warm start (the ILP: {status})", False, None


def _stage_starts(stage_of: list[int], units: Units) -> list[int]:
    """First node of every unit that begins a new stage in ``stage_of``."""
    return [
        m[0]
        for u, m in enumerate(units.members)
        if u > 0 and stage_of[m[0]] != stage_of[units.members[u - 1][0]]
    ]


@dataclass
class MemoryMinimum:
    """The plan whose largest stage memory is the smallest the ILP can express.

    Attributes:
        memory_bytes: that plan's largest stage memory in bytes, exact
            (:func:`~pipeoptim.compiler.costmodel.evaluate`): a limit of this many bytes is
            met, and when ``proven`` no plan over the units meets one byte less.
        stage_of: the plan, the stage of every node.
        proven: whether the solver proved the minimum (else it is an upper bound).
        num_units: how many units the graph was placed as.
    """

    memory_bytes: int
    stage_of: list[int]
    proven: bool
    num_units: int


def min_memory_plan(
    graph: CostGraph,
    config: CostConfig,
    *,
    solver: str = "auto",
    time_limit: float = 30.0,
    max_units: int = 64,
    units: Units | None = None,
    ideals: bool = True,
) -> MemoryMinimum:
    """The plan minimising the largest stage memory (bytes), over the units :func:`ilp`
    places the graph on whenever no contiguous split meets its memory limit, so that
    :attr:`MemoryMinimum.memory_bytes` is exactly the smallest limit :func:`ilp` plans.

    That is the dynamic program over ideals (:func:`ideal_dp`, exact) where the units have
    few enough ideals; else the ILP of the module docstring with memory as the objective, on
    units coarsened so that the least-memory contiguous split stays representable (it
    warm-starts the solver).

    Raises:
        PlanError: more stages than nodes that do work, or unknown solver.
    """
    solver = resolve_solver(solver)
    n = config.num_stages
    fine = fine_units(graph) if units is None else units
    _check_stages(fine, n)
    contiguous = fine.expand(_min_contiguous_split(fine, config))
    if ideals:
        exact = _exact_units(
            fine, n, _base_starts(graph, config, fine), max_units, coarsen_them=units is None
        )
        if exact is not None:
            chosen, ideal_sets = exact
            found = ideal_dp(chosen, ideal_sets, config, "memory")
            assert found is not None
            plan = chosen.expand(found[0])
            return MemoryMinimum(_peak_memory(graph, plan, config), plan, True, len(chosen))
    if units is None:
        units = coarsen(fine, max_units, n, keep_starts=frozenset(_stage_starts(contiguous, fine)))
    built = build_ilp(units, config, "memory")
    built.warm_start(_unit_stages(contiguous, units))
    status, proven, _gap_found = solve_ilp(built.prob, solver, time_limit, True, gap=0.0)
    best, peak = contiguous, _peak_memory(graph, contiguous, config)
    if status.startswith(("optimal", "feasible")):
        found_plan = units.expand([stage_from_z(built.z, u, n) for u in range(len(units))])
        if (found_peak := _peak_memory(graph, found_plan, config)) < peak:
            best, peak = found_plan, found_peak
    return MemoryMinimum(memory_bytes=peak, stage_of=best, proven=proven, num_units=len(units))


def min_feasible_memory(
    graph: CostGraph,
    config: CostConfig,
    *,
    solver: str = "auto",
    time_limit: float = 30.0,
    max_units: int = 64,
) -> int:
    """Smallest per-stage memory limit (bytes) that :func:`ilp` plans for: see :func:`min_memory_plan`."""
    return min_memory_plan(
        graph, config, solver=solver, time_limit=time_limit, max_units=max_units
    ).memory_bytes


def _memory_error(config: CostConfig, least: MemoryMinimum) -> InfeasibleMemoryError:
    limit = config.memory_limit or 0
    how = (
        f"proven the least over plans of these {least.num_units} units"
        if least.proven
        else "a plan meets it; the solver did not prove within its time limit that none needs less"
    )
    return InfeasibleMemoryError(
        f"no {config.num_stages}-stage plan fits in {format_bytes(limit)} per stage with method "
        f"{config.method!r}; the smallest feasible limit is {format_bytes(least.memory_bytes)} "
        f"({least.memory_bytes} bytes, {how}): raise --memory to at least that, use more stages, "
        "or a method that keeps fewer weight versions",
        limit_bytes=limit,
        min_feasible_bytes=least.memory_bytes,
    )


# ------------------------------------------------------------- contiguous splits


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
    _check_stages(units, config.num_stages)
    n = config.num_stages
    t = _prefix([units.time(u, config) for u in range(len(units))])
    cut = _cut_bytes(units)
    cut[0] = cut[-1] = 0.0
    params = _prefix([units.attr(u, "param_bytes") for u in range(len(units))])
    buffers = _prefix([units.attr(u, "buffer_bytes") for u in range(len(units))])
    saved = _prefix([units.attr(u, "saved_bytes") for u in range(len(units))])
    limit = config.memory_limit

    def stage_cost(a: np.ndarray, b: int, k: int) -> np.ndarray:
        cost = t[b] - t[a] + config.comm_s(1.0) * (cut[a] + cut[b])
        if limit is not None:
            mem = (
                (params[b] - params[a]) * config.weight_factor(k)
                + buffers[b]
                - buffers[a]
                + (saved[b] - saved[a]) * config.in_flight(k)
            )
            cost = np.where(mem <= limit, cost, np.inf)
        return cost

    unit_stage = _contiguous(units, n, stage_cost)
    if unit_stage is None:
        if not strict:
            return None
        least = _min_contiguous_memory(units, config)
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


def _min_contiguous_split(units: Units, config: CostConfig) -> list[int]:
    """Unit stages of the contiguous split with the smallest largest stage memory."""
    params = _prefix([units.attr(u, "param_bytes") for u in range(len(units))])
    buffers = _prefix([units.attr(u, "buffer_bytes") for u in range(len(units))])
    saved = _prefix([units.attr(u, "saved_bytes") for u in range(len(units))])

    def cost(a: np.ndarray, b: int, k: int) -> np.ndarray:
        return (
            (params[b] - params[a]) * config.weight_factor(k)
            + buffers[b]
            - buffers[a]
            + (saved[b] - saved[a]) * config.in_flight(k)
        )

    unit_stage = _contiguous(units, config.num_stages, cost)
    assert unit_stage is not None
    return unit_stage


def _min_contiguous_memory(units: Units, config: CostConfig) -> int:
    return _peak_memory(units.graph, units.expand(_min_contiguous_split(units, config)), config)


def _balanced(graph: CostGraph, config: CostConfig, weights: list[float], name: str) -> PartitionResult:
    start = time.perf_counter()
    units = fine_units(graph)
    _check_stages(units, config.num_stages)
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
    weights = [1.0 if n.time_s > 0 else 0.0 for n in graph.nodes]
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
    _check_stages(units, n)
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
