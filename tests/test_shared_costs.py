"""The cost model and the partitioners count a shared parameter as a copy per holding stage and
one gradient all-gather per step, not as a value sent every micro-batch (numbers by hand)."""

from __future__ import annotations

import pytest

from pipeoptim.compiler import baselines as B
from pipeoptim.compiler import partition as P
from pipeoptim.compiler.costgraph import CostGraph, CostNode
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.plan import make_plan
from pipeoptim.compiler.summary import summarize

W_BYTES = 1000  # the shared parameter
HIDDEN = 10  # every activation (and its gradient)


def tied_graph() -> CostGraph:
    """x -> a(x, W) -> b -> c(b, W) -> output, W a trainable parameter read by a and by c."""

    def compute(name: str, inputs: list[str], fwd: float) -> CostNode:
        return CostNode(
            name, "call_function", "f", inputs, fwd_s=fwd, bwd_s=2 * fwd, out_bytes=HIDDEN, grad_bytes=HIDDEN
        )

    nodes = [
        CostNode("x", "placeholder", "x", [], out_bytes=HIDDEN),
        CostNode("w", "get_attr", "w", [], out_bytes=W_BYTES, grad_bytes=W_BYTES, param_bytes=W_BYTES),
        compute("a", ["x", "w"], 1.0),
        compute("b", ["a"], 1.0),
        compute("c", ["b", "w"], 1.0),
        CostNode("output", "output", "output", ["c"]),
    ]
    return CostGraph("tied", nodes, batch_size=1)


def test_shared_parameter_is_held_by_each_reader_and_summed_once_per_step() -> None:
    graph = tied_graph()
    config = CostConfig(2, method="gpipe", micro_batches=4, bandwidth=100.0, opt_state_factor=1.0)
    stats = evaluate(graph, [0, 0, 0, 1, 1, 1], config)
    for s in stats:
        assert s.param_bytes == W_BYTES  # a copy each
        assert s.opt_state_bytes == W_BYTES
        assert s.send_bytes == HIDDEN and s.recv_bytes == HIDDEN  # a's output and its gradient only
        assert s.comm_s == pytest.approx(2 * HIDDEN / 100.0)
        assert s.shared_bytes == W_BYTES  # (h - 1) * B with h = 2 holders
        assert s.shared_s == pytest.approx(2 * W_BYTES / 100.0)
    assert stats[0].time_s == pytest.approx(3.0 + 0.2)  # a: fwd 1 + bwd 2, plus communication
    assert stats[1].time_s == pytest.approx(6.0 + 0.2)  # b and c
    # GPipe: (M + N - 1) stage times, then the step's gradient sum of the copies
    summary = summarize(graph, stats, config)
    assert summary["throughput_per_s"] == pytest.approx(1.0 / ((4 + 2 - 1) * 6.2 + 20.0))
    # one stage: nothing is shared, nothing is exchanged
    alone = evaluate(graph, [0] * 6, CostConfig(1, bandwidth=100.0))
    assert alone[0].param_bytes == W_BYTES and alone[0].shared_bytes == 0


def test_partitioners_do_not_pay_for_sending_a_shared_parameter() -> None:
    """Splitting between a and b costs 20 bytes of communication, not W's 2000 each
    micro-batch: the ILP and the exact DP find the brute-force optimum, and the plan lists
    the copy instead of a boundary value."""
    graph = tied_graph()
    config = CostConfig(2, bandwidth=100.0)
    best = B.brute_force(graph, config)
    expected = max(s.time_s for s in evaluate(graph, best.stage_of, config))
    # {a} | {b, c} or {a, b} | {c}: 6 s of compute plus 0.2 s for a 10-byte value and its
    # gradient; sending W each micro-batch would add 2 * 1000 bytes / 100 B/s = 20 s
    assert expected == pytest.approx(6.2)
    for ideals in (True, False):
        result = P.ilp(graph, config, max_units=1000, gap=1e-9, ideals=ideals)
        assert max(s.time_s for s in evaluate(graph, result.stage_of, config)) == pytest.approx(expected)
    plan = make_plan(graph, config)
    assert plan.shared == {"w": [0, 1]}
    assert all("w" not in io.inputs + io.outputs for io in plan.io)
    assert "held w by stages 0, 1; gradient sums 1000 B at stage 0, 1000 B at stage 1" in plan.table()
