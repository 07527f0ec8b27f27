"""Partition: assign graph nodes to pipeline stages.

The main partitioner, :func:`ilp`, is exact over the :mod:`pipeoptim.compiler.grouping` of a
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
  :mod:`pipeoptim.compiler.costmodel`); ``T >= T_s``, ``M_s <= limit``; minimise ``T``;
- with planned recomputation (``config.recompute``), a binary per stage chooses between its
  memory and time without and with recomputation (:mod:`pipeoptim.compiler.milp`).

The assignment formulation (``x[u, s]`` with ``stage(u) <= stage(v)``) is much slower to
solve; the cumulative one keeps the LP relaxation tighter (see ``../shared/PITFALLS.md``).
A known plan's bottleneck bounds ``T`` from above and confines every unit to a window of
stages (:func:`~pipeoptim.compiler.milp.stage_windows`), which fixes most binaries. The
relaxation stays weak where communication dominates (ResNet-101 in 16 stages: LP bound
10.9 ms against the optimum 19.8 ms), which is what the dynamic program over ideals avoids.

The baselines it is compared with, and the chain DP it starts from, are in
:mod:`pipeoptim.compiler.baselines`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from pipeoptim.compiler.assignment import PartitionResult, check_stages, peak_memory
from pipeoptim.compiler.baselines import chain_dp, min_contiguous_split
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.grouping import Units, coarsen, fine_units
from pipeoptim.compiler.ideals import enumerate_ideals, ideal_dp
from pipeoptim.compiler.ilp_solver import resolve_solver, solve_ilp
from pipeoptim.compiler.milp import IlpModel, build_ilp, stage_from_z
from pipeoptim.errors import InfeasibleMemoryError
from pipeoptim.methods import get_method
from pipeoptim.units import format_bytes


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
        PlanError: more stages than units of nodes that do work, or unknown solver.
        InfeasibleMemoryError: no plan over the units meets ``config.memory_limit``; the error
            carries the smallest limit one meets (:func:`min_memory_plan`).
    """
    start = time.perf_counter()
    solver = resolve_solver(solver)
    n = config.num_stages
    fine = fine_units(graph) if units is None else units
    check_stages(fine, n)
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
    least = fine.expand(min_contiguous_split(fine, config))
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
        status, optimal, final_gap, stage_of = _solve_from(built, units, warm_plan, solver, time_limit, gap)
        if not status.startswith(("optimal", "feasible")):
            break
        if config.memory_limit is None or limit is None:
            return stage_of, status, optimal, final_gap
        excess = peak_memory(graph, stage_of, config) - config.memory_limit
        if excess <= 0:
            return stage_of, status, optimal, final_gap
        limit -= excess + 1
    return warm_plan, f"warm start (the ILP: {status})", False, None


def _solve_from(
    built: IlpModel, units: Units, start: list[int], solver: str, time_limit: float, gap: float
) -> tuple[str, bool, float | None, list[int]]:
    """Solve ``built`` from the plan ``start``; return (status, optimal, gap, plan). Where
    HiGHS returns the start itself as optimal it is solved again without it: HiGHS 1.16 called
    its start optimal where brute force finds a plan 29% faster (tests/test_partition.py, seed
    10317), and without any start found no plan of a 200-unit ILP in a second."""
    n = len(built.rows)  # a row per stage
    built.warm_start(_unit_stages(start, units))
    status, optimal, found_gap = solve_ilp(built.prob, solver, time_limit, True, gap)
    plan = units.expand([stage_from_z(built.z, u, n) for u in range(len(units))])
    if solver == "highs" and optimal and plan == start:
        again = solve_ilp(built.prob, solver, time_limit, False, gap)
        if again[0].startswith(("optimal", "feasible")):
            status, optimal, found_gap = again
            plan = units.expand([stage_from_z(built.z, u, n) for u in range(len(units))])
    return status, optimal, found_gap, plan


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
        PlanError: more stages than units of nodes that do work, or unknown solver.
    """
    solver = resolve_solver(solver)
    n = config.num_stages
    fine = fine_units(graph) if units is None else units
    check_stages(fine, n)
    contiguous = fine.expand(min_contiguous_split(fine, config))
    if ideals:
        exact = _exact_units(
            fine, n, _base_starts(graph, config, fine), max_units, coarsen_them=units is None
        )
        if exact is not None:
            chosen, ideal_sets = exact
            found = ideal_dp(chosen, ideal_sets, config, "memory")
            assert found is not None
            plan = chosen.expand(found[0])
            return MemoryMinimum(peak_memory(graph, plan, config, "least"), plan, True, len(chosen))
    if units is None:
        units = coarsen(fine, max_units, n, keep_starts=frozenset(_stage_starts(contiguous, fine)))
    built = build_ilp(units, config, "memory")
    status, proven, _gap_found, found_plan = _solve_from(built, units, contiguous, solver, time_limit, 0.0)
    best, peak = contiguous, peak_memory(graph, contiguous, config, "least")
    found = status.startswith(("optimal", "feasible"))
    if found and (found_peak := peak_memory(graph, found_plan, config, "least")) < peak:
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


def memory_fixes(config: CostConfig) -> str:
    """What to change where no plan fits ``config``'s memory limit: the limit, more stages
    (fewer replicas where there are several), a method that holds less where one exists, each
    named as ``compile`` and the command line name it."""
    stages = "use more stages (gpus= in compile, --stages on the command line)"
    if config.data_parallel > 1:  # the devices the replicas take would hold more stages
        stages = (
            f"use more stages (fewer replicas than {config.data_parallel}: data_parallel=, --data-parallel)"
        )
    fixes = [stages]
    method = get_method(config.method)
    copies = method.extra_weight_copies(0, config.num_stages)
    if copies > 1:  # PipeDream's stash at the first stage
        fixes.append("a method that keeps fewer weight versions (pipeoptim keeps two, 1f1b one)")
    elif copies:
        fixes.append("a method that keeps fewer weight versions (1f1b keeps one)")
    elif method.schedule == "gpipe":
        fixes.append("method '1f1b', which holds fewer micro-batches' activations")
    limit = "raise the limit (memory= in compile, --memory on the command line) to at least that"
    return f"{limit}, {' or '.join(fixes)}"


def _memory_error(config: CostConfig, least: MemoryMinimum) -> InfeasibleMemoryError:
    limit = config.memory_limit or 0
    how = (
        f"proven the least over plans of these {least.num_units} units"
        if least.proven
        else "a plan meets it; the solver did not prove within its time limit that none needs less"
    )
    return InfeasibleMemoryError(
        f"no {config.num_stages}-stage plan fits in {format_bytes(limit)} ({limit} bytes) per stage "
        f"with method {config.method!r}; the smallest feasible limit is {format_bytes(least.memory_bytes)} "
        f"({least.memory_bytes} bytes, {how}): {memory_fixes(config)}",
        limit_bytes=limit,
        min_feasible_bytes=least.memory_bytes,
    )
