"""Planned recomputation (issue 18): the planners choose which stages recompute their
activations when a memory limit binds; checked against a brute force over assignments and
recomputation flags written from the definition (Chen et al., arXiv:1604.06174: a
recomputing stage keeps only its inputs per micro-batch and runs its forward again)."""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import pipeoptim
from pipeoptim.cli.main import cli
from pipeoptim.compiler import partition as P
from pipeoptim.compiler.assignment import PartitionResult
from pipeoptim.compiler.boundaries import stage_input_bytes
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.plan import Plan, plan_from_assignment
from pipeoptim.compiler.profile_cache import load_or_profile
from pipeoptim.compiler.trace import trace
from pipeoptim.errors import InfeasibleMemoryError

from .conftest import random_cost_graph
from .test_training import plain_training

OPT_STATE = 1.0  # CostConfig's default optimizer-state copies per parameter byte


def in_flight(method: str, k: int, n: int, m: int) -> int:
    """Micro-batches stage k holds: GPipe all M; 1F1B with flush min(N - k, M) (Narayanan et al. 2021)."""
    return m if method == "gpipe" else min(n - k, m)


_READERS: dict[int, list[list[int]]] = {}


def _readers(graph: CostGraph) -> list[list[int]]:
    if id(graph) not in _READERS:
        _READERS.clear()
        _READERS[id(graph)] = [
            [i for i, other in enumerate(graph.nodes) if node.name in other.inputs] for node in graph.nodes
        ]
    return _READERS[id(graph)]


def reference_stages(
    graph: CostGraph, stage: list[int], flags: tuple[bool, ...], config: CostConfig
) -> list[tuple[float, float]]:
    """(seconds, bytes) of every stage: forward and backward (plus the forward again where it
    recomputes) and the bytes moved over the bandwidth; weights, gradients and optimizer state,
    plus the saved activations of every micro-batch in flight, or where it recomputes the
    inputs it reads of every micro-batch in flight and one micro-batch's saved activations."""
    n, m = config.num_stages, config.micro_batches
    readers = _readers(graph)
    moved = [0.0] * n
    inputs = [0] * n
    for p, node in enumerate(graph.nodes):
        last = max((stage[r] for r in readers[p]), default=stage[p])
        for boundary in range(stage[p], last):
            moved[boundary] += node.out_bytes + node.grad_bytes
            moved[boundary + 1] += node.out_bytes + node.grad_bytes
        for k in {stage[r] for r in readers[p]}:
            if k > stage[p] or node.op == "placeholder":
                inputs[k] += node.out_bytes
    result = []
    for k in range(n):
        nodes = [x for i, x in enumerate(graph.nodes) if stage[i] == k]
        fwd = sum(x.fwd_s for x in nodes)
        again = sum(x.fwd_s for x in nodes if x.op != "output")  # the loss is not run again
        seconds = (
            fwd + sum(x.bwd_s for x in nodes) + moved[k] / config.bandwidth + (again if flags[k] else 0.0)
        )
        saved = sum(x.saved_bytes for x in nodes)
        held = in_flight(config.method, k, n, m)
        activations = saved + held * inputs[k] if flags[k] else held * saved
        weights = sum(x.param_bytes for x in nodes) * (2 + OPT_STATE)
        result.append((seconds, weights + activations))
    return result


def brute_force(graph: CostGraph, config: CostConfig, limit: float | None) -> tuple[float, float]:
    """(least bottleneck seconds among plans whose every stage fits ``limit``, least peak bytes
    over all plans), over every assignment and, with ``config.recompute``, every choice of
    recomputing stages."""
    n = config.num_stages
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    free = [i for i, node in enumerate(graph.nodes) if node.op not in ("placeholder", "output")]
    best, least = float("inf"), float("inf")
    for assign in itertools.product(range(n), repeat=len(free)):
        stage = [0] * len(graph.nodes)
        for i, s in zip(free, assign):
            stage[i] = s
        stage[-1] = n - 1
        if any(stage[index[src]] > stage[i] for i, node in enumerate(graph.nodes) for src in node.inputs):
            continue
        if {stage[i] for i in free} != set(range(n)):
            continue
        for flags in itertools.product((False, True) if config.recompute else (False,), repeat=n):
            stats = reference_stages(graph, stage, flags, config)
            peak = max(b for _, b in stats)
            least = min(least, peak)
            if limit is None or peak <= limit:
                best = min(best, max(s for s, _ in stats))
    return best, least


def graph_where_recompute_helps(seed: int, loss_s: float = 0.0) -> tuple[CostGraph, CostConfig, int, int]:
    """A random graph and config whose least peak memory is lower with recomputation than
    without; returns them with both least peaks (bytes). ``loss_s``: the output node's forward
    and backward seconds each (the loss priced on the last stage, pipeoptim.loss_cost)."""
    rng = random.Random(seed)
    for _ in range(50):
        drawn = random_cost_graph(rng, rng.randint(4, 6), max_inputs=2)
        # activations saved inside a node outweigh what it sends, as in real layers
        nodes = [replace(x, saved_bytes=x.saved_bytes * 8) for x in drawn.nodes]
        nodes[-1] = replace(nodes[-1], fwd_s=loss_s, bwd_s=loss_s)
        graph = CostGraph(drawn.model, nodes, batch_size=1)
        method = rng.choice(["gpipe", "1f1b"])
        config = CostConfig(rng.choice([2, 3]), method=method, micro_batches=4, bandwidth=3000.0)
        _, without = brute_force(graph, config, None)
        _, least = brute_force(graph, replace(config, recompute=True), None)
        if least < without:
            return graph, replace(config, recompute=True), int(least), int(without)
    raise AssertionError("no graph found where recomputation lowers the least memory")


@pytest.mark.parametrize("seed, loss_s", [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (6, 0.8), (9, 0.8)])
@pytest.mark.parametrize("ideals", [True, False])
def test_planners_equal_brute_force_over_assignments_and_recomputation(
    seed: int, loss_s: float, ideals: bool
) -> None:
    """Also where the loss is priced on the output node (``loss_s``): it counts on the last
    stage, but a recomputing last stage runs its forward again without the loss."""
    graph, config, least, without = graph_where_recompute_helps(seed, loss_s)
    plain = replace(config, recompute=False)
    solve = {"max_units": 1000, "ideals": ideals, "solver": "highs", "gap": 1e-9}
    # infeasible without recomputation, feasible with it; then a limit where it may pay off; then none
    for limit in (least, (least + without) // 2, without - 1, without, None):
        bound = replace(config, memory_limit=limit)
        expected, _ = brute_force(graph, bound, limit)
        result = P.ilp(graph, bound, **solve)
        assert result.optimal and (result.solver == P.IDEALS) == ideals
        stats = evaluate(graph, result.stage_of, bound)
        flags = tuple(s.recompute for s in stats)
        reference = reference_stages(graph, result.stage_of, flags, bound)
        assert [s.time_s for s in stats] == pytest.approx([s for s, _ in reference], rel=1e-12)
        assert [s.memory_bytes for s in stats] == [b for _, b in reference]
        assert max(s.time_s for s in stats) == pytest.approx(expected, rel=1e-9)
        assert limit is None or max(b for _, b in reference) <= limit
        # a stage recomputes only where it would not fit without: at equal time none is preferred
        alone = evaluate(graph, result.stage_of, bound, [False] * config.num_stages)
        assert all((s.memory_bytes > (limit or 0)) == r for s, r in zip(alone, flags)) or limit is None
        assert limit is not None or not any(flags)
        if limit is not None and limit < without:
            assert any(flags)
            with pytest.raises(InfeasibleMemoryError):
                P.ilp(graph, replace(plain, memory_limit=limit), **solve)
    with pytest.raises(InfeasibleMemoryError) as info:
        P.ilp(graph, replace(config, memory_limit=least - 1), **solve)
    assert info.value.min_feasible_bytes == least
    assert "the smallest feasible limit is" in str(info.value) and "\n" not in str(info.value)
    assert P.min_memory_plan(graph, config, max_units=1000, ideals=ideals).memory_bytes == least


def test_dp_over_ideals_equals_the_ilp_with_recomputation_on_a_larger_graph() -> None:
    rng = random.Random(101)
    drawn = random_cost_graph(rng, 16, max_inputs=3)  # hundreds of ideals: too many to brute-force
    graph = CostGraph(
        drawn.model, [replace(x, saved_bytes=x.saved_bytes * 8) for x in drawn.nodes], batch_size=1
    )
    config = CostConfig(3, method="gpipe", micro_batches=4, bandwidth=800.0, recompute=True)
    least = P.min_memory_plan(graph, config, max_units=1000).memory_bytes
    without = P.min_memory_plan(graph, replace(config, recompute=False), max_units=1000).memory_bytes
    assert least < without
    bound = replace(config, memory_limit=(least + without) // 2)
    exact = P.ilp(graph, bound, max_units=1000)
    solved = P.ilp(graph, bound, max_units=1000, ideals=False, gap=1e-9, solver="highs")
    assert exact.solver == P.IDEALS and solved.optimal
    plans = [evaluate(graph, r.stage_of, bound) for r in (exact, solved)]
    assert max(s.time_s for s in plans[0]) == pytest.approx(max(s.time_s for s in plans[1]), rel=1e-9)
    assert any(s.recompute for s in plans[0]) and all(s.memory_bytes <= bound.memory_limit for s in plans[1])
    for wrong in ("always", [True]):
        with pytest.raises(ValueError, match="recompute must be 'limit', 'least' or 3 flags"):
            evaluate(graph, exact.stage_of, bound, wrong)


class Wide(nn.Module):
    """A block with a wide hidden layer (large saved activations, small input), then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8)
        )
        self.head = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _batches(size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(size, 8, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(count)
    ]


def _sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def _train(
    model: nn.Module, batches: list, method: str, micro: int, **options: Any
) -> tuple[Any, list, dict]:
    """Train with the local executor, measuring what each stage holds; returns the plan, the
    losses, the state dict and every stage's measured peak activation bytes."""
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        _sgd(net),
        2,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        micro_batches=micro,
        executor="local",
        profile_dir=None,
        **options,
    ) as pipe:
        for stage in pipe._executor.stages:
            stage.measure_memory = True
        losses = [pipe.step(x, y).item() for x, y in batches]
        pipe.flush()
        held = [stage.memory_report()["activation_bytes"] for stage in pipe._executor.stages]
        return pipe.plan, losses, pipe.state_dict(), held


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_planned_recomputation_trains_like_plain_training_and_keeps_only_stage_inputs(method: str) -> None:
    model, micro = Wide(), 2
    batches = _batches(8, 3)
    x = batches[0][0][:4]
    traced = trace(Wide(), (x,))
    graph, _ = load_or_profile(traced, (x,), profile_dir=None)
    config = CostConfig(2, method=method, micro_batches=micro, opt_state_factor=1.0, recompute=True)
    least = P.min_memory_plan(graph, config).memory_bytes
    assert least < P.min_memory_plan(graph, replace(config, recompute=False)).memory_bytes
    plan, losses, state, held = _train(model, batches, method, micro, memory=least)
    assert plan.recompute == [True, False]
    assert "yes, +" in plan.table() and "recompute" in plan.table()
    expected, reference = plain_training(model, _sgd, batches, micro=micro)
    assert losses == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    # stage 0 keeps only its input (4 x 8 float32 per micro-batch) for each micro-batch in flight
    inputs = stage_input_bytes(graph, [plan.stage_of[n.name] for n in graph.nodes], 2)
    assert inputs[0] == 4 * 8 * 4
    assert held[0] == config.in_flight(0) * inputs[0]
    assert plan.stages[0].activation_bytes == config.in_flight(0) * inputs[0] + sum(
        n.saved_bytes for n in graph.nodes if plan.stage_of[n.name] == 0
    )
    _, _, _, held_plain = _train(model, batches, method, micro)
    assert held_plain[0] > 10 * held[0]


def test_recomputation_under_weight_stashing_equals_training_without_it() -> None:
    """PipeDream stashes the weights of every mini-batch in flight; the recomputing stage's
    forward is run again with the stashed version, so nothing changes."""
    model = Wide()
    batches = _batches(4, 6)
    x = batches[0][0]
    traced = trace(Wide(), (x,))
    graph, _ = load_or_profile(traced, (x,), profile_dir=None)
    config = CostConfig(2, method="pipedream", opt_state_factor=1.0)
    stage_of = [0 if n.module.startswith("body") or n.op == "placeholder" else 1 for n in graph.nodes]
    runs = []
    for flags in ([True, False], [False, False]):
        result = PartitionResult(stage_of, "given", "", "given", False, None, 0.0, len(stage_of), flags)
        plan = plan_from_assignment(graph, config, result)
        assert plan.recompute == flags
        runs.append(_train(model, batches, "pipedream", 1, plan=plan))
    (_, losses, state, held), (_, plain_losses, plain_state, plain_held) = runs
    assert losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-7)
    for key, value in plain_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    assert held[0] == config.in_flight(0) * x.numel() * 4 < plain_held[0]


def test_partition_cli_shows_the_recompute_column_and_plan_files_keep_it(tmp_path: Path) -> None:
    def run(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(
            cli,
            [
                "partition",
                "mlp",
                "--stages",
                "2",
                "--data-parallel",
                "1",
                "--profile-dir",
                str(tmp_path),
                *args,
            ],
        )
        return result.exit_code, result.stdout, result.stderr

    code, _, err = run("--memory", "1KiB")
    found = re.search(r"the smallest feasible limit is .* \((\d+) bytes", err)
    assert code == 1 and found, err
    least = int(found.group(1))
    code, out, err = run("--memory", str(least), "--save", str(tmp_path / "plan.json"))
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.split()[:2] == ["stage", "nodes"])
    assert "recompute" in header and "yes, +" in out
    code, _, err = run("--memory", str(least - 1))
    assert code == 1 and f"({least} bytes" in err
    data = json.loads((tmp_path / "plan.json").read_text())
    flags = [s["recompute"] for s in data["stages"]]
    assert any(flags) and Plan.from_dict(data).recompute == flags
    for stage in data["stages"]:  # a plan file written before planned recomputation
        del stage["recompute"], stage["recompute_s"]
    del data["config"]["recompute"]
    assert Plan.from_dict(data).recompute == [False, False]


def test_train_cli_plans_with_memory_and_its_stages_recompute(tmp_path: Path) -> None:
    common = [
        "train",
        "digits",
        "--stages",
        "2",
        "--data-parallel",
        "1",
        "--method",
        "gpipe",
        "--executor",
        "local",
        "--limit",
        "64",
    ]
    common += ["--epochs", "1", "--quiet", "--profile-dir", str(tmp_path / "profiles")]
    result = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "refused"), "--memory", "1KiB"])
    error = result.stderr.strip().splitlines()[-1]  # after the profiler's line
    found = re.search(r"the smallest feasible limit is .* \((\d+) bytes", error)
    assert result.exit_code == 1 and found, result.stderr
    result = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "run"), "--memory", found.group(1)])
    assert result.exit_code == 0, result.stderr
    stages = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]
    assert any(s["recompute"] for s in stages)
    assert max(s["memory_bytes"] for s in stages) == int(found.group(1))
