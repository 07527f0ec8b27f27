"""The cumulative ILP of :mod:`pipeoptim.compiler.partition`, built with PuLP and solved
by HiGHS or CBC: its variables and constraints (see that module's docstring), the stage
windows that fix most binaries, a warm start, and solving with the solvers' output kept off
standard output.

Planned recomputation (:mod:`pipeoptim.compiler.costmodel`, with ``config.recompute`` under a
memory limit or for the memory objective) adds one binary ``r[s]`` per stage: stage s
recomputes. Its inputs read ``y[p, s] >= z[unit(p), s-1] + x[v, s] - 1`` for a value p read
by unit v (stage 0: ``y[p, 0] >= x[v, 0]`` for a model input), ``I_s = sum_p bytes_p y[p, s]``.
The products of ``r[s]`` with the stage's assignment are linearised with big-M rows that
switch off with ``r[s]`` (``M``: all the bytes, or all the forward seconds, of the graph)::

    M_s(no recompute) = base_s + in_flight_s * S_s  <= limit + M r[s]
    M_s(recompute)    = base_s + S_s + in_flight_s * I_s <= limit + M (1 - r[s])
    top >= T_s;   top >= T_s + F_s - F_total (1 - r[s])

(``S_s`` saved, ``F_s`` forward seconds of stage s; for the memory objective ``top`` bounds
the same two memories the same way). The plan's flags are then chosen again by
:func:`~pipeoptim.compiler.costmodel.evaluate` (recomputation only where the limit binds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pulp

from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.grouping import LAST, Units
from pipeoptim.compiler.saved_overlaps import Overlap, overlaps

_MS = 1e3  # the ILP works in milliseconds ...
_MIB = 2.0**20  # ... and MiB, to keep coefficients near 1


def unit_stage_pin(units: Units, u: int, num_stages: int) -> int | None:
    p = units.pin[u]
    return None if p is None else (num_stages - 1 if p == LAST else p)


# --------------------------------------------------------------------------- ILP


def _variable(
    prob: pulp.LpProblem, name: str, low: float | None, up: float | None, cat: str = "Continuous"
) -> pulp.LpVariable:
    """A variable attached to ``prob`` (PuLP >= 3.3 API, plain ``LpVariable`` before)."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, lowBound=low, upBound=up, cat=cat)
    return pulp.LpVariable(name, lowBound=low, upBound=up, cat=cat)


def _reach(units: Units) -> np.ndarray:
    """``R[u, v]``: unit v is reachable from unit u along edges (u excluded), a U x U boolean matrix."""
    n = len(units)
    succ: list[list[int]] = [[] for _ in range(n)]
    for a, b in units.edges():
        succ[a].append(b)
    reach = np.zeros((n, n), dtype=bool)
    for u in range(n - 1, -1, -1):  # edges run forward, so successors are done first
        for v in succ[u]:
            reach[u] |= reach[v]
            reach[u, v] = True
    return reach


def stage_windows(units: Units, config: CostConfig, upper_s: float) -> list[tuple[int, int]]:
    """Per unit, the first and last stage it can be in within any plan whose bottleneck stage
    time is at most ``upper_s`` seconds.

    Stages ``0..k`` hold unit u and all its ancestors, so ``(k + 1) T >= A_u``, the work of
    u and its ancestors; stages ``k..N-1`` hold u and its descendants, so ``(N - k) T >= D_u``
    (stage time is at least its work, :func:`~pipeoptim.compiler.costmodel.evaluate`). With
    ``T <= upper_s`` (the bottleneck of a known plan) every unit is confined to
    ``ceil(A_u / T) - 1 <= k <= N - ceil(D_u / T)``, which fixes most binaries of the ILP.
    """
    n = config.num_stages
    times = np.array([units.time(u, config) for u in range(len(units))])
    reach = _reach(units)
    desc = times + reach.astype(float) @ times
    anc = times + reach.T.astype(float) @ times
    bound = upper_s * (1 + 1e-7) + 1e-15  # slack for float sums taken in another order
    windows = []
    for u in range(len(units)):
        pin = unit_stage_pin(units, u, n)
        lo = max(0, int(np.ceil(anc[u] / bound)) - 1)
        hi = min(n - 1, n - int(np.ceil(desc[u] / bound)))
        if pin is not None:
            lo = hi = pin
        windows.append((lo, hi) if lo <= hi else (0, n - 1))
    return windows


@dataclass
class IlpModel:
    """A built ILP: ``z[u, s]`` (a binary variable, or 0 or 1 where fixed), the objective
    variable ``top``, the crossing variables with the ``(z[a, s], z[b, s])`` pairs that bound
    them, and the expressions ``top`` bounds (one per stage). With recomputation: the input
    variables ``y`` and the storages' ``h`` (:func:`_saved_excess`) with the expressions
    bounding them from below, and per stage its binary
    ``r`` with its memory without and with recomputation and its forward time (``choices``),
    for the memory limit ``limit`` (MiB; ``None``: the memory objective)."""

    prob: pulp.LpProblem
    z: dict[tuple[int, int], pulp.LpVariable | int]
    top: pulp.LpVariable
    crossings: list[tuple[pulp.LpVariable, list[tuple[pulp.LpVariable | int, pulp.LpVariable | int]]]]
    rows: list[pulp.LpAffineExpression]
    reads: list[tuple[pulp.LpVariable, list[Any]]] = field(default_factory=list)
    choices: list[tuple[pulp.LpVariable, Any, Any, Any]] = field(default_factory=list)
    limit: float | None = None

    def warm_start(self, unit_stage: list[int]) -> None:
        """Set every variable to its value in the plan ``unit_stage`` (stage of every unit)."""
        for (u, s), var in self.z.items():
            if isinstance(var, pulp.LpVariable):
                var.setInitialValue(1 if unit_stage[u] <= s else 0)
        for c, pairs in self.crossings:
            c.setInitialValue(max(0, *(pulp.value(a) - pulp.value(b) for a, b in pairs)))
        for y, bounds in self.reads:
            y.setInitialValue(max(0, *(pulp.value(b) for b in bounds)))
        tops = [pulp.value(row) for row in self.rows]
        for s, (r, memory, recomputed, forward) in enumerate(self.choices):
            if self.limit is None:  # the memory objective: the smaller of the two
                again = pulp.value(recomputed) < pulp.value(memory)
                tops[s] = min(pulp.value(memory), pulp.value(recomputed))
            else:
                again = pulp.value(memory) > self.limit
                tops[s] += pulp.value(forward) if again else 0.0
            r.setInitialValue(1 if again else 0)
        self.top.setInitialValue(max(tops))


def build_ilp(
    units: Units,
    config: CostConfig,
    objective: str,
    upper_s: float | None = None,
    memory_limit: int | None = None,
) -> IlpModel:
    """The cumulative ILP; ``objective`` is ``"time"`` (min bottleneck) or ``"memory"``.

    ``upper_s``: the bottleneck (seconds) of a known plan; with it the time ILP keeps only
    plans at least as good, and fixes every ``z`` outside :func:`stage_windows`.
    ``memory_limit`` (bytes per stage) applies to the time ILP only.
    """
    n = config.num_stages
    prob = pulp.LpProblem("pipeline_partition", pulp.LpMinimize)
    if upper_s is not None and objective == "time":
        windows = stage_windows(units, config, upper_s)
    else:
        windows = [
            (p, p) if (p := unit_stage_pin(units, u, n)) is not None else (0, n - 1)
            for u in range(len(units))
        ]
    z: dict[tuple[int, int], pulp.LpVariable | int] = {}
    for u, (lo, hi) in enumerate(windows):
        for s in range(n):
            z[u, s] = 0 if s < lo else 1 if s >= hi else _variable(prob, f"z_{u}_{s}", 0, 1, "Binary")

    def free(*terms: pulp.LpVariable | int) -> bool:
        return any(isinstance(t, pulp.LpVariable) for t in terms)

    def fixed(term: pulp.LpVariable | int, value: int) -> bool:
        return not isinstance(term, pulp.LpVariable) and term == value

    for u in range(len(units)):
        for s in range(n - 2):
            if free(z[u, s], z[u, s + 1]):
                prob += z[u, s] <= z[u, s + 1]
    for a, b in sorted(units.edges()):
        for s in range(n - 1):
            if free(z[a, s], z[b, s]):
                prob += z[b, s] <= z[a, s]

    def x(u: int, s: int) -> pulp.LpAffineExpression:
        return z[u, s] - (z[u, s - 1] if s > 0 else 0)

    compute_units = [u for u in range(len(units)) if units.is_compute(u)]
    for s in range(n):
        if free(*(z[u, t] for u in compute_units for t in (s - 1, s) if t >= 0)):
            prob += pulp.lpSum(x(u, s) for u in compute_units) >= 1
    acts: list[pulp.LpAffineExpression] = [pulp.LpAffineExpression() for _ in range(n - 1)]
    with_comm = objective == "time" and config.bandwidth is not None
    crossings = units.crossings() if with_comm else {}
    crossing_vars: list[
        tuple[pulp.LpVariable, list[tuple[pulp.LpVariable | int, pulp.LpVariable | int]]]
    ] = []
    for i, ((a, readers), size) in enumerate(sorted(crossings.items())):
        cost = config.comm_s(size) * _MS
        for s in range(n - 1):
            if fixed(z[a, s], 0) or all(fixed(z[b, s], 1) for b in readers):
                continue  # produced after boundary s, or every reader is before it
            if fixed(z[a, s], 1) and any(fixed(z[b, s], 0) for b in readers):
                acts[s] += cost  # certainly crosses
                continue
            c = _variable(prob, f"c_{i}_{s}", 0, 1)
            crossing_vars.append((c, [(z[a, s], z[b, s]) for b in readers]))
            for b in readers:
                if free(z[a, s], z[b, s]):
                    prob += c >= z[a, s] - z[b, s]
            acts[s] += c * cost
    top = _variable(prob, "top", 0, None)
    rows = []
    again = config.recompute and (objective == "memory" or memory_limit is not None)
    reads: list[tuple[pulp.LpVariable, list[Any]]] = []
    choices: list[tuple[pulp.LpVariable, Any, Any, Any]] = []
    inputs = _recompute_inputs(prob, units, z, x, n, reads) if again else []
    big_bytes = sum(_unit_memory(units, u, 0, config, max_in_flight=True) for u in range(len(units)))
    most = max(config.in_flight(k) for k in range(n))
    big_bytes = (big_bytes + most * sum(units.graph.nodes[p].out_bytes for p, _ in units.producers())) / _MIB
    big_fwd = sum(units.attr(u, "again_s") for u in range(len(units))) * _MS
    found = overlaps(units)
    big_bytes += most * sum(o.nbytes for o in found) / _MIB
    for s in range(n):
        compute = pulp.lpSum(x(u, s) * (units.time(u, config, s) * _MS) for u in range(len(units)))
        comm = (acts[s - 1] if s > 0 else 0) + (acts[s] if s < n - 1 else 0) + config.latency_at(s) * _MS
        extra = _saved_excess(prob, found, x, s, reads)  # beyond the units' sum (saved_overlaps)
        memory = pulp.lpSum(x(u, s) * (_unit_memory(units, u, s, config) / _MIB) for u in range(len(units)))
        memory += extra * config.in_flight(s)
        r = _variable(prob, f"r_{s}", 0, 1, "Binary") if again else 0
        if again:
            base = pulp.lpSum(
                x(u, s) * ((_unit_memory(units, u, s, config) - _saved(units, u, s, config)) / _MIB)
                for u in range(len(units))
            )
            saved = (
                pulp.lpSum(x(u, s) * (units.attr(u, "saved_bytes") / _MIB) for u in range(len(units))) + extra
            )
            recomputed = base + saved + inputs[s] * (config.in_flight(s) / _MIB)
            forward = pulp.lpSum(x(u, s) * (units.attr(u, "again_s") * _MS) for u in range(len(units)))
            assert isinstance(r, pulp.LpVariable)
            choices.append((r, memory, recomputed, forward))
        if objective == "time":
            prob += top >= compute + comm
            rows.append(compute + comm)
            if again:
                assert memory_limit is not None
                prob += top >= compute + comm + forward - big_fwd * (1 - r)
                prob += memory <= memory_limit / _MIB + big_bytes * r
                prob += recomputed <= memory_limit / _MIB + big_bytes * (1 - r)
            elif memory_limit is not None:
                prob += memory <= memory_limit / _MIB
        elif again:
            prob += top >= memory - big_bytes * r
            prob += top >= recomputed - big_bytes * (1 - r)
            rows.append(memory)
        else:
            prob += top >= memory
            rows.append(memory)
    if objective == "time":
        # Valid bounds the LP relaxation does not see (it may split a unit across stages).
        times = [units.time(u, config) for u in range(len(units))]
        prob += top >= max(times) * _MS
        prob += top >= sum(times) / n * _MS
        if upper_s is not None:
            prob += top <= upper_s * _MS * (1 + 1e-7)
    prob += top
    limit = None if objective == "memory" or memory_limit is None else memory_limit / _MIB
    return IlpModel(prob, z, top, crossing_vars, rows, reads, choices, limit)


def _saved_excess(
    prob: pulp.LpProblem,
    found: list[Overlap],
    x: Callable[[int, int], Any],
    s: int,
    bounded: list[tuple[pulp.LpVariable, list[Any]]],
) -> Any:
    """MiB per micro-batch stage ``s`` saves beyond its units' sum of ``saved_bytes``
    (:mod:`pipeoptim.compiler.saved_overlaps`): per overlap a variable ``h`` in [0, 1], at least
    1 where the stage holds one of its savers and none of its owners, minus the bytes the sum
    counts where the stage holds its first saver. Each ``h`` joins ``bounded`` with the
    expressions bounding it from below (for the warm start)."""
    terms = []
    for i, o in enumerate(found):
        held = _variable(prob, f"h_{i}_{s}", 0, 1)
        owned = pulp.lpSum(x(w, s) for w in o.owners)  # a stage holding an owner holds it as a weight
        bounds = [x(u, s) - owned for u in o.savers]
        for bound in bounds:
            prob += held >= bound
        bounded.append((held, bounds))
        terms.append((held - (x(o.first, s) if o.first is not None else 0)) * (o.nbytes / _MIB))
    return pulp.lpSum(terms)


def _unit_memory(units: Units, u: int, stage: int, config: CostConfig, max_in_flight: bool = False) -> float:
    """Bytes unit ``u`` adds to stage ``stage`` (``max_in_flight``: at the most any stage holds)."""
    stages = range(config.num_stages) if max_in_flight else [stage]
    return max(
        units.attr(u, "param_bytes") * config.weight_factor(k)
        + units.attr(u, "buffer_bytes")
        + units.attr(u, "saved_bytes") * config.in_flight(k)
        for k in stages
    )


def _saved(units: Units, u: int, stage: int, config: CostConfig) -> float:
    return units.attr(u, "saved_bytes") * config.in_flight(stage)


def _recompute_inputs(
    prob: pulp.LpProblem, units: Units, z: dict, x: Any, n: int, reads: list[tuple[pulp.LpVariable, list]]
) -> list[pulp.LpAffineExpression]:
    """Per stage s, the bytes of the values it receives and reads (``I_s``, module docstring),
    as ``sum bytes_p y[p, s]`` with ``y[p, s] >= 0`` pushed to 1 where p is read in s; each
    ``y`` and the expressions bounding it go into ``reads``."""
    inputs = [pulp.LpAffineExpression() for _ in range(n)]
    for p, readers in units.producers():
        node = units.graph.nodes[p]
        if not node.out_bytes:
            continue
        producer = units.unit_of[p]
        for s in range(n):
            if s == 0 and node.op != "placeholder":
                continue
            y = _variable(prob, f"y_{p}_{s}", 0, 1)
            bounds = [x(v, s) if s == 0 else z[producer, s - 1] + x(v, s) - 1 for v in readers]
            for bound in bounds:
                prob += y >= bound
            reads.append((y, bounds))
            inputs[s] += y * node.out_bytes
    return inputs


def stage_from_z(z: dict, u: int, n: int) -> int:
    """The first stage s with ``z[u, s] = 1``."""
    for s in range(n):
        value = z[u, s] if isinstance(z[u, s], int) else z[u, s].value()
        if round(value or 0) == 1:
            return s
    return n - 1
