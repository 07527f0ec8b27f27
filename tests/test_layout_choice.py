"""The planner chooses the layout by default (issue 15): the layout prediction is the compiled
plan's, the all-reduce and shared cores use the α + β and cores of the plan's cost model, and
tied weights count at every stage holding a copy in the memory limit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import pipeoptim
from pipeoptim.cli.main import cli
from pipeoptim.compiler import baselines as B
from pipeoptim.compiler import partition as P
from pipeoptim.compiler import profile_model
from pipeoptim.compiler.assignment import peak_memory
from pipeoptim.compiler.costgraph import CostGraph, CostNode
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.layouts import choose_layout
from pipeoptim.compiler.plan import make_plan
from pipeoptim.errors import InfeasibleMemoryError, PlanError
from tests.test_layouts import chain


def test_allreduce_latency_and_shared_cores_by_hand() -> None:
    """Two layers of 10 kB at 1 MB/s with α = 1 ms on ONE shared core (numbers by hand):
    1 × 2: half the rows each (0.03 s), a ring all-reduce of 2(R−1)/R·20 kB/β plus 2(R−1)
    messages of α (0.022 s), and both replicas' work on the one core: 2 × 0.052 s.
    2 × 1: each stage 0.03 s plus 1.6 kB and two messages (0.0036 s); both on the core: 0.0672 s.
    1 × 1: all the rows, 0.06 s, alone on its core. One rank is best."""
    graph = chain(params=10_000, fwds=(0.01, 0.01))
    config = CostConfig(2, bandwidth=1e6, latency_s=1e-3, cores=1)
    choice = choose_layout(graph, config, 2)
    by = {(o.stages, o.replicas): o for o in choice.options}
    assert by[(1, 2)].plan.stages[0].allreduce_s == pytest.approx(20_000 / 1e6 + 2e-3, rel=1e-12)
    assert by[(1, 2)].throughput_per_s == pytest.approx(1 / (2 * 0.052), rel=1e-12)
    assert by[(2, 1)].throughput_per_s == pytest.approx(1 / (2 * 0.0336), rel=1e-12)
    assert by[(1, 1)].throughput_per_s == pytest.approx(1 / 0.06, rel=1e-12)
    assert by[(1, 2)].plan.summary["cores_bound"] and by[(1, 1)].plan.config.cores is None
    assert (choice.chosen.stages, choice.chosen.replicas) == (1, 1)
    # with a core per rank the pipeline wins: 1 / 0.0336 against 1 / 0.052 and 1 / 0.06
    own = choose_layout(graph, replace(config, cores=None), 2)
    assert (own.chosen.stages, own.chosen.replicas) == (2, 1)
    assert own.chosen.throughput_per_s == pytest.approx(1 / 0.0336, rel=1e-12)


def tied_chain() -> CostGraph:
    """x -> a(x, W) -> b -> c -> d(c, W) -> output, W (1 kB) read by a and d, c holding 1 kB
    of its own; forwards 1, 2, 1, 1 s (backward twice)."""

    def compute(name: str, inputs: list[str], fwd: float, params: int = 0) -> CostNode:
        return CostNode(name, "call_function", "f", inputs, fwd_s=fwd, bwd_s=2 * fwd, param_bytes=params)

    return CostGraph(
        "tied_chain",
        [
            CostNode("x", "placeholder", "x", []),
            CostNode("w", "get_attr", "w", [], out_bytes=1000, grad_bytes=1000, param_bytes=1000),
            compute("a", ["x", "w"], 1.0),
            compute("b", ["a"], 2.0),
            compute("c", ["b"], 1.0, params=1000),
            compute("d", ["c", "w"], 1.0),
            CostNode("output", "output", "output", ["d"]),
        ],
        batch_size=1,
    )


def test_tied_copies_count_in_the_memory_limit_as_brute_force() -> None:
    """3 stages, 3 bytes held per parameter byte (weights, gradient, momentum): the fastest split
    a | b | c d (6 s) keeps c's 1 kB and a copy of W in the last stage, 6 kB, over a 4 kB
    limit that counting W once (at a's stage) lets it meet; brute force, with the copies
    counted, finds 9 s, and so does the plan; the least limit is 3 kB (a | b c | d)."""
    graph = tied_chain()
    config = CostConfig(3, method="gpipe", micro_batches=3, memory_limit=4000)
    once = P.ilp(graph, config)  # the partitioner's own constraints count W once
    assert peak_memory(graph, once.stage_of, config) == 6000 > config.memory_limit
    best = B.brute_force(graph, config)
    expected = max(s.time_s for s in evaluate(graph, best.stage_of, config))
    assert expected == pytest.approx(9.0)
    plan = make_plan(graph, config)
    assert plan.summary["bottleneck_s"] == pytest.approx(expected)
    assert plan.summary["max_memory_bytes"] <= config.memory_limit
    assert plan.shared == {"w": [0, 2]} and plan.stages[2].param_bytes == 1000  # the copy
    tight = replace(config, memory_limit=2999)  # W alone needs 3 kB at two stages
    with pytest.raises(PlanError):
        B.brute_force(graph, tight)
    with pytest.raises(InfeasibleMemoryError, match="a copy of w at every stage that reads it") as error:
        make_plan(graph, tight)
    assert error.value.min_feasible_bytes == 3000  # a | b c | d: 3 kB each, as brute force finds
    at_least = make_plan(graph, replace(config, memory_limit=3000))
    assert at_least.summary["max_memory_bytes"] == 3000 and at_least.summary["bottleneck_s"] == pytest.approx(
        9.0
    )


def test_gpt_tied_embeddings_fit_the_limit_with_every_copy(tmp_path: Path) -> None:
    """The GPT-style model with tied input and output embeddings: under limits below what the
    unlimited plan needs, every stage of the plan, and of every feasible layout, fits with its
    copy of the embedding counted (the partitioners' constraints count it once), or the error
    names a limit that a plan then meets."""
    from tests.test_shared_params import batches, gpt

    graph, _ = profile_model(gpt(), (batches(1)[0][0],), profile_dir=tmp_path)
    config = CostConfig(2, method="pipeoptim", bandwidth=1e9, opt_state_factor=2.0)
    free = make_plan(graph, config)
    assert list(free.shared.values()) == [[0, 1]]  # both stages hold the embedding
    embedding = graph.nodes[graph.index(next(iter(free.shared)))].param_bytes
    assert all(s.param_bytes >= embedding for s in free.stages)
    for fraction in (1.0, 0.9, 0.8):
        limited = replace(config, memory_limit=int(fraction * free.summary["max_memory_bytes"]) - 1)
        try:
            plan = make_plan(graph, limited)
        except InfeasibleMemoryError as exc:  # then the limit it names is met, copies counted
            assert exc.min_feasible_bytes > limited.memory_limit
            plan = make_plan(graph, replace(limited, memory_limit=exc.min_feasible_bytes))
            limited = replace(limited, memory_limit=exc.min_feasible_bytes)
        stage_of = [plan.stage_of[n.name] for n in graph.nodes]
        assert plan.shared and peak_memory(graph, stage_of, limited) <= limited.memory_limit
        choice = choose_layout(graph, replace(limited, num_stages=4), 4)
        for option in choice.options:
            if option.plan is not None:
                assert option.plan.summary["max_memory_bytes"] <= limited.memory_limit


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        # the pass over the gradients float16's loss scaling makes (the search left it out,
        # helper-173), and the loss priced from targets: each in the search as compiled
        {"autocast": torch.float16, "method": "gpipe"},
        {"example_targets": torch.arange(16) % 4},
    ],
    ids=["plain", "float16", "targets"],
)
def test_layout_prediction_is_the_compiled_plans(tmp_path: Path, extra: dict) -> None:
    """compile(..., data_parallel="auto") plans every layout of 4 devices; compiling each of
    them as asked for gives a plan that predicts exactly the throughput the search listed
    (same profiles, bandwidth, latency, action overhead, update costs and shared cores)."""
    model, x = mlp(), torch.randn(16, 16)
    options = dict(
        example_inputs=x,
        loss_fn=F.cross_entropy,
        executor="local",
        profile_dir=tmp_path,
        bandwidth="1GB/s",
        latency=2e-4,
        action_overhead=5e-5,
        **extra,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with pipeoptim.compile(model, opt, 4, data_parallel="auto", **options) as pipe:
        layouts = pipe.plan.summary["layouts"]
        chosen = (pipe.plan.num_stages, pipe.plan.config.data_parallel)
        assert chosen == (layouts["stages"], layouts["data_parallel"])
        assert pipe.plan.summary["throughput_per_s"] == layouts["options"][0]["throughput_per_s"]
    if extra:
        return  # the chosen layout is as searched; each layout compiled alone: the plain case
    feasible = [o for o in layouts["options"] if o["feasible"]]
    assert {(o["stages"], o["data_parallel"]) for o in feasible} >= {(4, 1), (2, 2), (1, 4), (1, 1)}
    for o in feasible:
        n, r = o["stages"], o["data_parallel"]
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        with pipeoptim.compile(model, opt, n * r, data_parallel=r, **options) as pipe:
            assert pipe.plan.summary["throughput_per_s"] == pytest.approx(o["throughput_per_s"], rel=1e-12)
            assert (pipe.plan.summary["num_stages"], pipe.plan.summary["data_parallel"]) == (n, r)
            assert pipe.plan.config.latency_s == 2e-4 and pipe.plan.config.action_overhead_s == 5e-5


def test_partition_profiles_each_layouts_own_micro_batch(tmp_path: Path) -> None:
    """``partition mlp --gpus 2``: 1 × 2 is planned from micro-batches of half the rows, and the
    saved plan records the layout and the search."""
    saved = tmp_path / "plan.json"
    args = ["partition", "mlp", "--gpus", "2", "--json", "--profile-dir", str(tmp_path), "--save", str(saved)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    rows = {(o["stages"], o["data_parallel"]): o["rows"] for o in data["layouts"]["options"]}
    assert rows[(1, 2)] * 2 == rows[(2, 1)] == rows[(1, 1)]
    plan = pipeoptim.compiler.plan.Plan.load(saved)
    assert (plan.num_stages, plan.config.data_parallel) == (data["num_stages"], data["data_parallel"])
    assert plan.batch_size == rows[(plan.num_stages, plan.config.data_parallel)]
    assert plan.summary["layouts"] == data["layouts"]


def test_train_gpus_4_runs_the_chosen_layout(tmp_path: Path) -> None:
    """``train digits --gpus 4`` (no layout flag) runs the layout the planner chose, and says so."""
    out = tmp_path / "run"
    args = ["train", "digits", "--gpus", "4", "--executor", "local", "--epochs", "1", "--limit", "128"]
    args += ["--quiet", "--out", str(out), "--profile-dir", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    layout, options = metrics["layout"], metrics["layout"]["options"]
    best = max((o for o in options if o["feasible"]), key=lambda o: o["throughput_per_s"])
    assert (layout["stages"], layout["data_parallel"]) == (best["stages"], best["data_parallel"])
    assert len(metrics["stages"]) == layout["stages"] and len(options) == 8
    stages = f"{layout['stages']} stage" + ("s" if layout["stages"] > 1 else "")  # "1 stage x 2 replicas"
    words = f"({stages}" + (f" x {best['data_parallel']} replicas)" if best["data_parallel"] > 1 else ")")
    assert words in result.stdout, result.stdout


def test_auto_layout_is_refused_under_torchrun() -> None:
    """torchrun's world size fixes the ranks: data_parallel='auto' says to pass the R chosen."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"cannot run under torchrun.*pass data_parallel=R"):
        pipeoptim.compile(
            model,
            opt,
            4,
            data_parallel="auto",
            executor="torchrun",
            example_inputs=torch.randn(8, 16),
            loss_fn=F.cross_entropy,
        )


def test_the_search_keeps_only_layouts_compile_runs(tmp_path: Path) -> None:
    """Clipping with an asynchronous method runs on any number of stages but on one replica
    only: the replicated layout is listed as infeasible with compile's reason, and one of the
    others is chosen."""
    from pipeoptim.compile_layout import plan_best_layout

    model = mlp()
    choice = plan_best_layout(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        2,
        example_inputs=torch.randn(8, 16),
        loss_fn=F.cross_entropy,
        executor="local",
        profile_dir=tmp_path,
        max_grad_norm=1.0,
    )
    assert choice.chosen.replicas == 1
    reasons = {(o.stages, o.replicas): o.reason for o in choice.options if o.plan is None}
    assert set(reasons) == {(1, 2)}
    assert "max_grad_norm" in reasons[(1, 2)]


def test_a_given_plan_fixes_the_layout_of_data_parallel_auto(tmp_path: Path) -> None:
    """``data_parallel="auto"`` with ``plan=``: the plan's N stages × R replicas are built (a
    2 × 2 plan was refused as "this pipeline has data-parallel=1" once the search chose 1
    replica), on fewer ranks than ``gpus`` where the plan needs fewer; a plan for more devices
    than ``gpus`` or another forced N is refused, naming both."""
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    options = dict(example_inputs=x, loss_fn=F.cross_entropy, executor="local", profile_dir=tmp_path)
    model = mlp()
    with pipeoptim.compile(
        model, torch.optim.SGD(model.parameters(), lr=0.1), 4, data_parallel=2, method="1f1b", **options
    ) as pipe:
        saved = tmp_path / "plan.json"
        pipe.plan.save(saved)
        want = [pipe.step(x, y).item() for _ in range(3)]
    for gpus in (4, 6):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pipeoptim.compile(
            model, opt, gpus, data_parallel="auto", method="1f1b", plan=saved, **options
        ) as pipe:
            assert (pipe.plan.num_stages, pipe.plan.config.data_parallel) == (2, 2)
            assert pipe.plan.stage_of == pipeoptim.compiler.plan.Plan.load(saved).stage_of
            assert [pipe.step(x, y).item() for _ in range(3)] == want
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PlanError, match=r"for 2 stages x 2 replicas \(4 devices\), more than the 3 given"):
        pipeoptim.compile(model, opt, 3, data_parallel="auto", method="1f1b", plan=saved, **options)
    from pipeoptim.compile_layout import compile_best_layout

    with pytest.raises(PlanError, match=r"for 2 stages x 2 replicas, not 4 stages"):
        compile_best_layout(pipeoptim.compile, model, opt, 4, stages=4, method="1f1b", plan=saved, **options)
    for gpus in ("4", None, 0, True, 4.0):  # checked as without a plan (helper-158: a raw TypeError)
        with pytest.raises(ValueError, match=r"gpus must be a positive integer \(devices\)"):
            pipeoptim.compile(model, opt, gpus, data_parallel="auto", method="1f1b", plan=saved, **options)
