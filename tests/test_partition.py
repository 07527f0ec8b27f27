"""The ILP partitioner against brute force, the chain DP and the baselines."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeoptim.compiler import baselines as B
from pipeoptim.compiler import partition as P
from pipeoptim.compiler.cost_node import CostNode
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.grouping import coarsen, fine_units
from pipeoptim.compiler.milp import unit_stage_pin
from pipeoptim.compiler.plan import make_plan
from pipeoptim.errors import InfeasibleMemoryError, PlanError

from .conftest import random_cost_graph


def bottleneck(graph: CostGraph, stage_of: list[int], config: CostConfig) -> float:
    return max(s.time_s for s in evaluate(graph, stage_of, config))


def assert_valid(graph: CostGraph, stage_of: list[int], config: CostConfig) -> None:
    stats = evaluate(graph, stage_of, config)  # raises on a backward edge
    assert len(stage_of) == len(graph.nodes)
    assert {s for s in stage_of} <= set(range(config.num_stages))
    if config.memory_limit is not None:
        assert all(s.memory_bytes <= config.memory_limit for s in stats)
    assert all(s.num_nodes > 0 for s in stats)


configs = st.builds(
    CostConfig,
    num_stages=st.integers(2, 3),
    method=st.sampled_from(["pipeoptim", "pipedream", "2bw", "spectrain", "none", "gpipe", "1f1b"]),
    micro_batches=st.integers(1, 4),
    bandwidth=st.sampled_from([None, 300.0, 3000.0]),
    memory_limit=st.sampled_from([None, 5000, 9000]),
    opt_state_factor=st.sampled_from([0.0, 1.0, 2.0]),
    # seconds per parameter byte: up to ~1 s per node, as much as its compute (the weight
    # policy's share differs between stages: none at the last stage of pipeoptim/pipedream)
    step_s_per_byte=st.sampled_from([0.0, 5e-4]),
    predict_s_per_byte=st.sampled_from([0.0, 1e-3]),
    copy_s_per_byte=st.sampled_from([0.0, 1e-3]),
    # seconds per message: the middle stages' four against the ends' two (helper-129)
    latency_s=st.sampled_from([0.0, 0.3]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**6),
    size=st.integers(3, 7),
    chain=st.booleans(),
    config=configs,
    ideals=st.booleans(),
    storages=st.booleans(),
)
def test_ilp_equals_brute_force(
    seed: int, size: int, chain: bool, config: CostConfig, ideals: bool, storages: bool
) -> None:
    """With ``ideals`` the exact DP over ideals answers; without, the ILP itself. With
    ``storages`` a value saved by nodes of two stages is held by both, as the cost model counts
    it: the partitioners summed each node's saved bytes, and a plan they called within the
    memory limit was over it (helper-136)."""
    graph = random_cost_graph(random.Random(seed), size, chain=chain, storages=storages)
    try:
        best = B.brute_force(graph, config)
    except PlanError:
        with pytest.raises(InfeasibleMemoryError) as info:
            P.ilp(graph, config, max_units=1000, gap=1e-9, ideals=ideals)
        # the smallest feasible limit it names is above the asked limit
        assert info.value.min_feasible_bytes > (config.memory_limit or 0)
        return
    result = P.ilp(graph, config, max_units=1000, gap=1e-9, ideals=ideals)
    assert result.optimal and result.status == "optimal"
    assert result.solver == (P.IDEALS if ideals else "highs")
    assert_valid(graph, result.stage_of, config)
    expected = bottleneck(graph, best.stage_of, config)
    assert bottleneck(graph, result.stage_of, config) == pytest.approx(expected, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    size=st.integers(5, 30),
    stages=st.integers(2, 5),
    bandwidth=st.sampled_from([None, 500.0]),
)
def test_ilp_equals_dp_on_chains(seed: int, size: int, stages: int, bandwidth: float | None) -> None:
    graph = random_cost_graph(random.Random(seed), size, chain=True)
    method = random.Random(seed).choice(["pipeoptim", "pipedream", "spectrain", "gpipe"])
    config = CostConfig(
        stages,
        method=method,
        bandwidth=bandwidth,
        predict_s_per_byte=1e-3,
        copy_s_per_byte=1e-3,
        latency_s=random.Random(seed).choice([0.0, 0.2]),
    )
    dp = B.chain_dp(graph, config)
    result = P.ilp(graph, config, max_units=1000, gap=1e-9, ideals=False)
    assert dp is not None
    assert bottleneck(graph, result.stage_of, config) == pytest.approx(
        bottleneck(graph, dp.stage_of, config), rel=1e-6
    )


def _peak_memories(graph: CostGraph, config: CostConfig) -> list[int]:
    """The largest stage memory of every valid plan (brute force over the fine units)."""
    units, n = fine_units(graph), config.num_stages
    compute = [u for u in range(len(units)) if units.is_compute(u)]
    pins = [unit_stage_pin(units, u, n) for u in range(len(units))]
    peaks = set()
    for assign in itertools.product(range(n), repeat=len(units)):
        if {assign[u] for u in compute} != set(range(n)) or any(
            p is not None and assign[u] != p for u, p in enumerate(pins)
        ):
            continue
        try:
            stats = evaluate(graph, units.expand(list(assign)), config)
        except ValueError:  # an edge backwards
            continue
        peaks.add(max(s.memory_bytes for s in stats))
    return sorted(peaks)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(3, 6), chain=st.booleans())
@example(seed=10317, size=6, chain=False)  # HiGHS called its warm start optimal (CI, 2026-12-06)
def test_partitioners_meet_limits_that_bind_with_saved_storages(seed: int, size: int, chain: bool) -> None:
    """A value saved by nodes of two stages (a ReLU's output, saved by it and by the next
    layer) is held by both: the partitioners summed each node's saved bytes, so a plan they
    called within a memory limit was over it, and a limit a plan meets was refused (a ResNet
    at 9 MiB, helper-136). At limits that bind (the peaks of the plans themselves), the DP over
    ideals, the ILP and, on chains, the chain DP equal brute force."""
    graph = random_cost_graph(random.Random(seed), size, chain=chain, storages=True)
    config = CostConfig(2 + seed % 2, method="pipedream", opt_state_factor=1.0, bandwidth=300.0)
    for limit in _peak_memories(graph, config)[::3]:
        limited = replace(config, memory_limit=limit)
        best = bottleneck(graph, B.brute_force(graph, limited).stage_of, limited)
        found = [P.ilp(graph, limited, max_units=1000, gap=1e-9, ideals=ideals) for ideals in (True, False)]
        if chain:
            found.append(B.chain_dp(graph, limited))
        for result in found:
            assert_valid(graph, result.stage_of, limited)
            assert bottleneck(graph, result.stage_of, limited) == pytest.approx(best, rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(6, 30), stages=st.integers(2, 5))
def test_ilp_never_worse_than_baselines(seed: int, size: int, stages: int) -> None:
    graph = random_cost_graph(random.Random(seed), size, max_inputs=3)
    config = CostConfig(stages, bandwidth=800.0)
    ilp = bottleneck(graph, P.ilp(graph, config, max_units=1000, ideals=False).stage_of, config)
    for name, baseline in B.BASELINES.items():
        result = baseline(graph, config)
        assert_valid(graph, result.stage_of, config)
        other = bottleneck(graph, result.stage_of, config)
        assert ilp <= other * (1 + 1e-4), name
    dp = B.chain_dp(graph, config)
    assert dp is not None and ilp <= bottleneck(graph, dp.stage_of, config) * (1 + 1e-4)


def test_infeasible_memory_names_smallest_feasible_limit() -> None:
    graph = random_cost_graph(random.Random(3), 12)
    config = CostConfig(3, memory_limit=100)
    with pytest.raises(InfeasibleMemoryError, match="smallest feasible limit") as info:
        P.ilp(graph, config)
    least = info.value.min_feasible_bytes
    ok = P.ilp(graph, CostConfig(3, memory_limit=least))
    assert_valid(graph, ok.stage_of, CostConfig(3, memory_limit=least))
    with pytest.raises(InfeasibleMemoryError):
        P.ilp(graph, CostConfig(3, memory_limit=int(least * 0.99)))


def test_more_stages_than_nodes_is_a_clear_error() -> None:
    graph = random_cost_graph(random.Random(1), 3)
    with pytest.raises(PlanError, match="only 3 unit"):
        P.ilp(graph, CostConfig(5))
    with pytest.raises(ValueError, match="num_stages must be a positive integer, got 0"):
        CostConfig(0)


def test_coarsening_keeps_contiguous_units_and_a_dag() -> None:
    graph = random_cost_graph(random.Random(7), 300, max_inputs=3)
    fine = fine_units(graph)
    units = coarsen(fine, 40, 4)
    assert len(units) <= 40
    assert sorted(i for m in units.members for i in m) == list(range(len(graph.nodes)))
    assert all(a < b for a, b in units.edges())
    result = P.ilp(graph, CostConfig(4, bandwidth=1000.0), max_units=40)
    assert_valid(graph, result.stage_of, CostConfig(4, bandwidth=1000.0))
    assert result.num_units <= 40


SOLVE_IN_A_FRESH_PROCESS = """
import random, sys
sys.path.insert(0, sys.argv[1])
from tests.conftest import random_cost_graph
from pipeoptim.compiler import partition as P
from pipeoptim.compiler.costmodel import CostConfig
graph = random_cost_graph(random.Random(11), 25, max_inputs=3)
result = P.ilp(graph, CostConfig(4, bandwidth=600.0), solver=sys.argv[2], ideals=False)
print("stages", len(set(result.stage_of)))
"""


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_the_ilp_solver_prints_nothing(solver: str) -> None:
    """The first solver a process makes prints nothing on either stream: HiGHS printed its
    banner (to standard error, kept off standard output) under every ``compile`` whose plan
    needed the ILP once ``auto`` chose it (helper-166)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("highspy")
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", SOLVE_IN_A_FRESH_PROCESS, root, solver],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stages 4\n"
    assert "HiGHS" not in done.stderr and "CBC" not in done.stderr, done.stderr


def test_solvers_agree() -> None:
    pytest.importorskip("highspy")
    graph = random_cost_graph(random.Random(11), 25, max_inputs=3)
    config = CostConfig(4, bandwidth=600.0, memory_limit=20000)
    cbc = P.ilp(graph, config, solver="cbc", gap=1e-9, ideals=False)
    highs = P.ilp(graph, config, solver="highs", gap=1e-9, ideals=False)
    assert cbc.optimal and highs.optimal
    assert bottleneck(graph, cbc.stage_of, config) == pytest.approx(
        bottleneck(graph, highs.stage_of, config), rel=1e-6
    )


def test_time_limit_reports_status_and_gap() -> None:
    graph = random_cost_graph(random.Random(5), 400, max_inputs=3)
    result = P.ilp(graph, CostConfig(12, bandwidth=300.0), time_limit=1.0, max_units=200, ideals=False)
    assert result.status in ("optimal", "feasible (time limit)")
    if not result.optimal:
        assert result.gap is None or result.gap > 0
    assert_valid(graph, result.stage_of, CostConfig(12, bandwidth=300.0))


@pytest.mark.parametrize("name", ["resnet101", "vgg16", "inception_v3", "alexnet", "gpt2"])
def test_shared_gpu_cost_graphs_plan(shared_dir, name: str) -> None:
    graph = CostGraph.load(shared_dir / "profiles" / f"{name}.json")
    config = CostConfig(4, bandwidth=25e9)
    result = P.ilp(graph, config)
    assert_valid(graph, result.stage_of, config)
    ilp = bottleneck(graph, result.stage_of, config)
    for baseline in B.BASELINES.values():
        assert ilp <= bottleneck(graph, baseline(graph, config).stage_of, config) * (1 + 1e-3)


def test_values_that_cannot_be_sent_stay_in_one_unit_with_their_users() -> None:
    from pipeoptim.compiler.profile import profile_model
    from pipeoptim.compiler.trace import trace
    from pipeoptim.examples import transformer

    model, inputs = transformer()
    graph = profile_model(trace(model, inputs), inputs, warmup=1, repeats=1)
    unit_of = {i: u for u, members in enumerate(fine_units(graph).members) for i in members}
    held = [i for i, n in enumerate(graph.nodes) if not n.sendable and graph.users()[i]]
    assert held  # TinyGPT reads attributes such as x.device, which cannot cross a boundary
    for i in held:
        assert {unit_of[u] for u in graph.users()[i]} == {unit_of[i]}, graph.nodes[i].name
    # so every plan, whatever the timings, can be built into stages
    for n in (2, 4, 8):
        stage_of = P.ilp(graph, CostConfig(num_stages=n), time_limit=10).stage_of
        for i in held:
            assert {stage_of[u] for u in graph.users()[i]} == {stage_of[i]}


@pytest.mark.parametrize("ideals", [True, False])
def test_latency_moves_the_cuts_toward_the_middle(ideals: bool) -> None:
    """A chain of 24 equal nodes (0.5 ms each) on 4 stages, 0.5 ms per message: the middle
    stages send and receive 4 messages, the ends 2. The partitioners placed cuts by work alone,
    6/6/6/6 (stages 4, 5, 5, 4 ms), and called it optimal; 7/5/5/7 takes 4.5 ms at every stage."""
    nodes = [CostNode("x", "placeholder", "x", [], out_bytes=8)]
    for i in range(24):
        nodes.append(CostNode(f"n{i}", "call_module", f"n{i}", [nodes[-1].name], fwd_s=2e-4, bwd_s=3e-4))
    nodes.append(CostNode("output", "output", "output", ["n23"]))
    graph = CostGraph("chain", nodes, batch_size=8)
    config = CostConfig(4, latency_s=5e-4)
    for stage_of in (P.ilp(graph, config, ideals=ideals).stage_of, B.chain_dp(graph, config).stage_of):
        assert bottleneck(graph, stage_of, config) == pytest.approx(4.5e-3)
        assert [stage_of.count(k) for k in range(4)] == [8, 5, 5, 8]  # with x and output


def test_a_weight_two_branches_share_does_not_order_them() -> None:
    """A parameter read by a cheap branch (first in node order) and a heavy one: in its first
    reader's unit it put the heavy branch after the cheap one's stage, and the plan took
    20.2 ms where 10.2 ms was possible, called optimal (helper-129)."""
    mib = 2**20

    def node(
        name: str, op: str, inputs: list[str], ms: float = 0.0, out: int = 0, param: int = 0
    ) -> CostNode:
        return CostNode(
            name, op, name, inputs, fwd_s=ms * 4e-4, bwd_s=ms * 6e-4, out_bytes=out, param_bytes=param
        )

    graph = CostGraph(
        "branches",
        [
            node("x", "placeholder", [], out=mib),
            replace(node("w", "get_attr", [], out=mib, param=mib), params=["w"]),
            node("cheap", "call_function", ["x", "w"], 0.125, out=400 * mib),
            node("b", "call_function", ["x"], 0.125, out=mib),
            node("heavy", "call_function", ["b", "w"], 10, out=mib),
            node("heavier", "call_function", ["heavy"], 10, out=mib),
            node("output", "output", ["cheap", "heavier"]),
        ],
        batch_size=8,
    )
    config = CostConfig(2, bandwidth=25e9)
    # the heavy branch in stage 0, the cheap one beside its reader of its 400 MiB (baselines'
    # brute force enumerates the planner's own units, so it took the false order too)
    best = bottleneck(graph, [0, 0, 1, 0, 0, 1, 1], config)
    assert best == pytest.approx(10.21e-3, rel=1e-3)
    plan = make_plan(graph, config)
    assert bottleneck(graph, [plan.stage_of[n.name] for n in graph.nodes], config) == pytest.approx(best)
    assert plan.stage_of["w"] == min(plan.stage_of["cheap"], plan.stage_of["heavy"])  # held where read


@pytest.mark.parametrize("partitioner", ["ilp", "chain_dp"])
def test_a_tied_weight_is_no_activation_crossing_the_cuts(partitioner: str) -> None:
    """A chain of 8 equal nodes whose first and last read one 100 MB weight (an embedding and
    its tied head) on 4 stages: with the weight's bytes moved onto its readers, its get_attr
    kept them as an output, priced as an activation crossing every cut, and the plans took
    9 ms where 6 ms was possible, called optimal (helper-131)."""
    weight = 100_000_000
    nodes = [
        CostNode("x", "placeholder", "x", [], out_bytes=1000),
        CostNode(
            "w", "get_attr", "w", [], out_bytes=weight, grad_bytes=weight, param_bytes=weight, params=["w"]
        ),
    ]
    for i in range(8):
        inputs = [nodes[-1].name, "w"] if i in (0, 7) else [nodes[-1].name]
        nodes.append(
            CostNode(
                f"n{i}", "call_function", "f", inputs, fwd_s=1e-3, bwd_s=2e-3, out_bytes=1000, grad_bytes=1000
            )
        )
    nodes.append(CostNode("output", "output", "output", ["n7"]))
    graph = CostGraph("tied_chain", nodes, batch_size=1)
    config = CostConfig(4, method="1f1b", micro_batches=4, bandwidth=25e9)
    splits = (
        [0, 0, *(sum(i >= c for c in cuts) for i in range(8)), 3]
        for cuts in itertools.combinations(range(1, 8), 3)
    )
    best = min(bottleneck(graph, stage_of, config) for stage_of in splits)
    plan = make_plan(graph, config, partitioner=partitioner)
    assert bottleneck(graph, [plan.stage_of[n.name] for n in graph.nodes], config) == pytest.approx(best)
    assert best == pytest.approx(6e-3, rel=1e-2)
