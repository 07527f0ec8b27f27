"""Exact partitioning by dynamic programming over the ideals of the unit DAG.

A plan of the cumulative ILP (:mod:`pipeoptim.compiler.partition`) is a chain of *ideals*
(downward-closed sets of units, closed under predecessors) ``I_0 ⊂ I_1 ⊂ ... ⊂ I_{N-1}``:
stage k holds ``I_k \\ I_{k-1}``. Tarnawski et al., "Efficient Algorithms for Device Placement
of DNN Graph Operators" (NeurIPS 2020, Section 4), minimise the bottleneck over such chains
with a dynamic program over ideals::

    best[k][I] = min over ideals I' ⊊ I of max(best[k-1][I'], cost_k(I \\ I'))

which is exact and, for the narrow graphs of real models (chains of blocks with a few
parallel branches), has few ideals. ``cost_k`` is the stage time of the cost model
(:mod:`pipeoptim.compiler.costmodel`: work, plus the bytes crossing the boundaries before and
after the stage over the bandwidth) or the stage memory. Graphs with more than
``max_ideals`` ideals are left to the ILP.

With :attr:`~pipeoptim.compiler.costmodel.CostConfig.recompute`, a stage ``I \\ I'`` may
recompute its activations (the cost model's planned recomputation): under a memory limit it
costs its time without recomputation where its memory fits, else its time plus its forward
where its memory with recomputation fits, else it is not allowed; for the memory objective it
costs the smaller of its two memories. The bytes a recomputing stage keeps per micro-batch
depend on both ideals (the values produced in ``I'`` that a unit of ``I \\ I'`` reads), an
ideals x ideals matrix built only when recomputation can matter.
"""

from __future__ import annotations

import numpy as np

from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.grouping import LAST, Units
from pipeoptim.compiler.saved_overlaps import excess, overlaps

#: Default cap on the number of ideals (the program holds a few ideals x ideals matrices).
MAX_IDEALS = 1500


def enumerate_ideals(units: Units, max_ideals: int = MAX_IDEALS) -> np.ndarray | None:
    """Every ideal that can end a stage before the last one: it holds the units pinned to
    stage 0 and none pinned to the last stage; then the set of all units.

    Returns:
        A boolean matrix, one row per ideal (ordered by size, all units last) and one column
        per unit, or ``None`` when there are more than ``max_ideals``.
    """
    n = len(units)
    pred = [0] * n
    for a, b in units.edges():
        pred[b] |= 1 << a
    first = 0
    for u in range(n):
        if units.pin[u] == 0:
            first |= (1 << u) | pred[u]
    allowed = [units.pin[u] != LAST for u in range(n)]
    seen = {first}
    frontier = [first]
    while frontier:
        grown = []
        for ideal in frontier:
            for v in range(n):
                bit = 1 << v
                if allowed[v] and not ideal & bit and pred[v] & ~ideal == 0 and ideal | bit not in seen:
                    seen.add(ideal | bit)
                    grown.append(ideal | bit)
                    if len(seen) > max_ideals:
                        return None
        frontier = grown
    full = (1 << n) - 1
    rows = [*sorted(seen - {full}, key=lambda i: (i.bit_count(), i)), full]
    return np.array([[(i >> u) & 1 for u in range(n)] for i in rows], dtype=bool)


def _input_bytes(units: Units, ideals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes a recomputing stage keeps per micro-batch (its inputs it reads,
    :func:`~pipeoptim.compiler.boundaries.stage_input_bytes`): ``inner[i, j]`` for the stage
    ``ideals[j] \\ ideals[i]``, ``first[j]`` for the first stage ``ideals[j]`` (the model
    inputs its units read)."""
    groups: dict[tuple[int, tuple[int, ...]], int] = {}
    first = np.zeros(len(ideals))
    for p, readers in units.producers():
        node = units.graph.nodes[p]
        if node.out_bytes:
            key = (units.unit_of[p], tuple(readers))
            groups[key] = groups.get(key, 0) + node.out_bytes
            if node.op == "placeholder":
                first += node.out_bytes * ideals[:, readers].any(axis=1)
    inner = np.zeros((len(ideals), len(ideals)))
    for (producer, readers), size in groups.items():
        read = np.zeros((len(ideals), len(ideals)), dtype=bool)
        for r in readers:
            read |= ideals[None, :, r] & ~ideals[:, None, r]
        inner += size * (read & ideals[:, producer, None])
    return inner, first


def ideal_dp(
    units: Units,
    ideals: np.ndarray,
    config: CostConfig,
    objective: str = "time",
    *,
    memory_limit: int | None = None,
) -> tuple[list[int], float] | None:
    """The plan minimising the bottleneck stage time (``objective="time"``, seconds) or the
    largest stage memory (``"memory"``, bytes) exactly, over every plan of the units.

    Args:
        ideals: :func:`enumerate_ideals` of ``units``.
        memory_limit: bytes per stage a time-optimal plan must meet (``None``: no limit).

    Returns:
        ``(stage of every unit, objective value)``, or ``None`` when no plan meets the limit.
    """
    n = config.num_stages
    a = ideals.astype(float)
    sums = {
        name: a @ np.array([units.attr(u, name) for u in range(len(units))], dtype=float)
        for name in ("param_bytes", "buffer_bytes", "saved_bytes")
    }
    work = a @ np.array([units.time(u, config) for u in range(len(units))])
    count = a @ np.array([units.is_compute(u) for u in range(len(units))], dtype=float)
    cut = np.zeros(len(ideals))
    for (producer, readers), size in units.crossings().items():
        cut += size * (ideals[:, producer] & ~ideals[:, list(readers)].all(axis=1))
    comm = config.comm_s(1.0) * cut
    comm[-1] = 0.0  # nothing leaves the last stage
    # subset[i, j]: ideal i is a proper subset of ideal j with at least one unit doing work between
    subset = (a @ (1.0 - a).T == 0) & (count[None, :] - count[:, None] >= 1)

    def diff(v: np.ndarray) -> np.ndarray:
        return v[None, :] - v[:, None]

    found = overlaps(units)  # what a stage saves beyond its units' sum (saved_overlaps)
    extra = excess(found, ideals, ideals) if found else 0.0
    extra_0 = excess(found, np.zeros((1, len(units)), dtype=bool), ideals)[0] if found else 0.0
    saved = sums["saved_bytes"]
    sums["saved_bytes"] = saved + extra_0  # the first stage: from no unit
    mem_parts = [diff(sums["param_bytes"]), diff(sums["buffer_bytes"]), diff(saved) + extra]
    d_work = diff(work)
    again = config.recompute and (objective == "memory" or memory_limit is not None)
    if again:
        inner, first = _input_bytes(units, ideals)
        fwd = a @ np.array([units.attr(u, "again_s") for u in range(len(units))], dtype=float)

    def choose(time: np.ndarray, mem: np.ndarray, time_re: np.ndarray, mem_re: np.ndarray) -> np.ndarray:
        """A stage's cost: without recomputation where it fits, else with it (module docstring)."""
        if objective == "memory":
            return np.minimum(mem, mem_re)
        assert memory_limit is not None
        return np.where(mem <= memory_limit, time, np.where(mem_re <= memory_limit, time_re, inf))

    inf = np.inf
    best = np.full(len(ideals), inf)
    arg = []
    for k in range(n):
        params, buffers, saved = mem_parts
        if k == 0:
            base = sums["param_bytes"] * config.weight_factor(0) + sums["buffer_bytes"]
            mem = base + sums["saved_bytes"] * config.in_flight(0)
            time = work + sums["param_bytes"] * config.weight_s_per_byte(0) + comm + config.latency_at(0)
            cost = time if objective == "time" else mem
            ok = count >= 1
            if again:
                cost = choose(time, mem, time + fwd, base + sums["saved_bytes"] + config.in_flight(0) * first)
                ok &= np.isfinite(cost)
            elif memory_limit is not None:
                ok &= mem <= memory_limit
            best = np.where(ok, cost, inf)
            arg.append(np.full(len(ideals), -1))
        else:
            base = params * config.weight_factor(k) + buffers
            mem = base + saved * config.in_flight(k)
            time = d_work + params * config.weight_s_per_byte(k) + comm[:, None] + comm[None, :]
            time = time + config.latency_at(k)
            cost = time if objective == "time" else mem
            ok = subset.copy()
            if again:
                cost = choose(time, mem, time + diff(fwd), base + saved + config.in_flight(k) * inner)
                ok &= np.isfinite(cost)
            elif memory_limit is not None:
                ok &= mem <= memory_limit
            total = np.where(ok, np.maximum(best[:, None], cost), inf)
            arg.append(total.argmin(axis=0))
            best = total.min(axis=0)
        if k < n - 1:
            best[-1] = inf  # only the last stage may end with every unit
    value = best[-1]
    if not np.isfinite(value):
        return None
    unit_stage = [0] * len(units)
    j = len(ideals) - 1
    for k in range(n - 1, -1, -1):
        i = int(arg[k][j])
        inside = ideals[j] & ~ideals[i] if i >= 0 else ideals[j]
        for u in np.flatnonzero(inside):
            unit_stage[u] = k
        j = i
    return unit_stage, float(value)
