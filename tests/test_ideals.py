"""The exact dynamic program over ideals against an independent brute force and the ILP."""

from __future__ import annotations

import itertools
import random

import pytest

from pipeoptim.compiler import partition as P
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.grouping import fine_units
from pipeoptim.compiler.ideals import enumerate_ideals

from .conftest import random_cost_graph


def reference_bottleneck(graph: CostGraph, n: int, bandwidth: float) -> float:
    """Every assignment of nodes to n stages, written from the cost model's definition: a
    stage's time is its nodes' forward and backward seconds plus the bytes it sends and
    receives over the bandwidth, where a value (activation forward, gradient backward)
    read k stages later crosses each of the k boundaries between; no edge runs backwards,
    every stage holds a node that does work, inputs are in the first stage, the output in
    the last."""
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    free = [i for i, node in enumerate(graph.nodes) if node.op not in ("placeholder", "output")]
    best = float("inf")
    for assign in itertools.product(range(n), repeat=len(free)):
        stage = [0] * len(graph.nodes)
        for i, s in zip(free, assign):
            stage[i] = s
        stage[-1] = n - 1
        if any(stage[index[src]] > stage[i] for i, node in enumerate(graph.nodes) for src in node.inputs):
            continue
        if {stage[i] for i in free} != set(range(n)):
            continue
        moved = [0.0] * n  # bytes sent plus received per stage
        for p, node in enumerate(graph.nodes):
            readers = [stage[i] for i, other in enumerate(graph.nodes) if node.name in other.inputs]
            for boundary in range(stage[p], max(readers, default=stage[p])):
                size = node.out_bytes + node.grad_bytes
                moved[boundary] += size
                moved[boundary + 1] += size
        times = [
            sum(node.fwd_s + node.bwd_s for i, node in enumerate(graph.nodes) if stage[i] == k)
            + moved[k] / bandwidth
            for k in range(n)
        ]
        best = min(best, max(times))
    return best


def bottleneck(graph: CostGraph, stage_of: list[int], config: CostConfig) -> float:
    return max(s.time_s for s in evaluate(graph, stage_of, config))


@pytest.mark.parametrize("seed", range(12))
def test_dp_over_ideals_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    graph = random_cost_graph(rng, rng.randint(4, 7), max_inputs=3)
    n = rng.choice([2, 3])
    bandwidth = rng.choice([300.0, 3000.0])
    config = CostConfig(n, bandwidth=bandwidth)
    result = P.ilp(graph, config, max_units=1000)
    assert result.solver == P.IDEALS and result.status == "optimal"
    assert bottleneck(graph, result.stage_of, config) == pytest.approx(
        reference_bottleneck(graph, n, bandwidth), rel=1e-9
    )


@pytest.mark.parametrize("seed", range(4))
def test_dp_over_ideals_equals_the_ilp_on_larger_graphs(seed: int) -> None:
    rng = random.Random(100 + seed)
    graph = random_cost_graph(rng, 16, max_inputs=3)  # 296 to 738 ideals
    config = CostConfig(rng.choice([3, 5]), bandwidth=800.0, memory_limit=rng.choice([None, 30_000]))
    exact = P.ilp(graph, config, max_units=1000)
    solved = P.ilp(graph, config, max_units=1000, ideals=False, gap=1e-9, solver="highs")
    assert exact.solver == P.IDEALS and solved.optimal
    assert bottleneck(graph, exact.stage_of, config) == pytest.approx(
        bottleneck(graph, solved.stage_of, config), rel=1e-6
    )


def test_ideals_are_the_downward_closed_sets() -> None:
    graph = random_cost_graph(random.Random(9), 8, max_inputs=2)
    units = fine_units(graph)
    found = {tuple(row) for row in enumerate_ideals(units).tolist()}
    edges = units.edges()
    expected = set()
    for bits in itertools.product([False, True], repeat=len(units)):
        closed = all(bits[a] or not bits[b] for a, b in edges)
        pinned = all(bits[u] for u in range(len(units)) if units.pin[u] == 0)
        whole = all(bits)
        if closed and pinned and (whole or not bits[-1]):
            expected.add(bits)
    assert found == expected
    assert enumerate_ideals(units, max_ideals=3) is None
