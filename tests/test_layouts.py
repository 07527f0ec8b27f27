"""The layout planner: N stages × R replicas of G devices (``pipeoptim.compiler.layouts``)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeoptim.cli.main import cli
from pipeoptim.compiler import baselines as P
from pipeoptim.compiler.costgraph import CostGraph, CostNode
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.layouts import choose_layout, rows_factor, scale_rows
from pipeoptim.compiler.plan import Plan, plan_from_assignment
from pipeoptim.errors import InfeasibleMemoryError, PlanError
from pipeoptim.units import format_bytes
from tests.conftest import random_cost_graph


def brute_force_layout(graph: CostGraph, config: CostConfig, gpus: int) -> tuple[float, set[tuple[int, int]]]:
    """Best predicted throughput over every layout with N·R ≤ gpus, every plan of each found by
    enumerating every assignment, and the layouts that reach it."""
    best, layouts = 0.0, set()
    for n in range(1, gpus + 1):
        for r in range(1, gpus // n + 1):
            m = config.micro_batches if config.method_info.micro_batched else 1
            factor = rows_factor(config.method, gpus, n, r, m)
            scaled = scale_rows(graph, factor)
            layout = replace(config, num_stages=n, micro_batches=m, data_parallel=r)
            try:
                result = P.brute_force(scaled, layout)
            except PlanError:
                continue
            value = plan_from_assignment(scaled, layout, result).summary["throughput_per_s"]
            if value > best * (1 + 1e-9):
                best, layouts = value, {(n, r)}
            elif value >= best * (1 - 1e-9):
                layouts.add((n, r))
    return best, layouts


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ["pipeoptim", "1f1b"])
def test_chosen_layout_equals_brute_force_over_layouts(seed: int, method: str) -> None:
    rng = random.Random(seed)
    graph = replace(random_cost_graph(rng, 6), batch_size=8)
    config = CostConfig(4, method=method, micro_batches=2, bandwidth=rng.choice([2e3, 2e4]))
    choice = choose_layout(graph, config, 4, micro_batches=2 if method == "1f1b" else None)
    best, layouts = brute_force_layout(graph, config, 4)
    assert choice.chosen.throughput_per_s == pytest.approx(best, rel=1e-9)
    assert (choice.chosen.stages, choice.chosen.replicas) in layouts
    assert len(choice.options) == 8  # (1,1..4), (2,1..2), (3,1), (4,1)
    assert choice.chosen.plan.config.data_parallel == choice.chosen.replicas


def chain(params: int, fwds: tuple[float, float]) -> CostGraph:
    """Two layers of ``params`` bytes each, backward twice the forward, 800-byte boundary."""
    nodes = [CostNode("x", "placeholder", "x", [], out_bytes=800)]
    for i, fwd in enumerate(fwds):
        nodes.append(
            CostNode(
                f"n{i}",
                "call_module",
                f"n{i}",
                [nodes[-1].name],
                fwd_s=fwd,
                bwd_s=2 * fwd,
                out_bytes=800,
                grad_bytes=800,
                param_bytes=params,
            )
        )
    nodes.append(CostNode("output", "output", "output", ["n1"]))
    return CostGraph("chain", nodes, batch_size=8)


def test_replicated_throughput_is_the_ring_allreduce_formula_by_hand() -> None:
    """1 stage × 2 replicas, asynchronous 1F1B: each replica computes half the rows, then
    all-reduces every gradient byte with the ring's 2(R−1)/R factor at the bandwidth."""
    graph, bandwidth = chain(params=10_000, fwds=(0.01, 0.01)), 1e6
    config = CostConfig(2, method="pipeoptim", bandwidth=bandwidth)
    option = next(o for o in choose_layout(graph, config, 2).options if (o.stages, o.replicas) == (1, 2))
    compute = 2 * (0.01 + 0.02) / 2  # two nodes, half the rows
    allreduce = 2 * (2 - 1) / 2 * 20_000 / bandwidth
    assert option.throughput_per_s == pytest.approx(1 / (compute + allreduce), rel=1e-12)
    # 2 stages × 1 replica: one node each, the boundary's activation and gradient each way
    pipeline = next(o for o in choose_layout(graph, config, 2).options if (o.stages, o.replicas) == (2, 1))
    assert pipeline.throughput_per_s == pytest.approx(1 / (0.03 + 1600 / bandwidth), rel=1e-12)


def test_a_slow_link_keeps_the_pipeline_and_a_fast_one_replicates() -> None:
    """The second layer takes 5x the first: two stages wait on it (0.15 s), two replicas
    share all the work (0.09 s) but all-reduce 20 kB (0.2 s at 100 kB/s, 20 µs at 1 GB/s)."""
    graph = chain(params=10_000, fwds=(0.01, 0.05))
    slow = choose_layout(graph, CostConfig(2, bandwidth=1e5), 2).chosen
    fast = choose_layout(graph, CostConfig(2, bandwidth=1e9), 2).chosen
    assert (slow.stages, slow.replicas) == (2, 1)
    assert (fast.stages, fast.replicas) == (1, 2)


def neutral(tmp_path: Path) -> Path:
    from tests.test_partition_inputs import neutral_graph

    path = tmp_path / "graph.json"
    data = neutral_graph()
    data["batch_size"] = 16
    path.write_text(json.dumps(data))
    return path


def test_cli_chooses_lists_runner_ups_and_records_the_layout(tmp_path: Path) -> None:
    path, saved = neutral(tmp_path), tmp_path / "plan.json"
    args = ["partition", "--profile", str(path), "--gpus", "4"]  # no flag: the planner chooses
    result = CliRunner().invoke(cli, [*args, "--json", "--save", str(saved)])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    layouts = data["layouts"]
    options = layouts["options"]
    best = max(o["throughput_per_s"] for o in options)
    assert options[0]["throughput_per_s"] == best == data["throughput_per_s"]
    chosen = (layouts["stages"], layouts["data_parallel"])
    assert chosen == (options[0]["stages"], options[0]["data_parallel"])
    assert (data["num_stages"], data["data_parallel"]) == (layouts["stages"], layouts["data_parallel"])
    plan = Plan.load(saved)
    assert (plan.num_stages, plan.config.data_parallel) == (layouts["stages"], layouts["data_parallel"])
    assert len(options) == 8 and plan.summary["layouts"] == layouts  # the plan file keeps the search
    explicit = json.loads(CliRunner().invoke(cli, [*args, "--json", "--data-parallel", "auto"]).stdout)
    assert explicit["layouts"] == layouts
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0 and "chosen layout" in text.stdout and "stages x replicas" in text.stdout


@pytest.mark.parametrize(
    "flags, searched",
    [
        ([], {(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)}),
        (["--data-parallel", "2"], {(1, 2), (2, 2)}),  # R forced: N searched
        (["--stages", "2"], {(2, 1), (2, 2)}),  # N forced: R searched
        (["--stages", "3"], {(3, 1)}),
        (["--stages", "2", "--data-parallel", "2"], {(2, 2)}),  # both: exactly that layout
        (["--stages", "1", "--data-parallel", "3"], {(1, 3)}),  # 3 of the 4 devices
    ],
)
def test_cli_flags_force_layouts_and_the_rest_is_searched(
    tmp_path: Path, flags: list[str], searched: set[tuple[int, int]]
) -> None:
    base = ["partition", "--profile", str(neutral(tmp_path)), "--gpus", "4", "--json"]
    result = CliRunner().invoke(cli, [*base, *flags])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    options = data["layouts"]["options"]
    assert {(o["stages"], o["data_parallel"]) for o in options} == searched
    best = max((o for o in options if o["feasible"]), key=lambda o: o["throughput_per_s"])
    assert (data["num_stages"], data["data_parallel"]) == (best["stages"], best["data_parallel"])
    assert data["throughput_per_s"] == best["throughput_per_s"]


def test_cli_refuses_a_layout_that_does_not_fit(tmp_path: Path) -> None:
    base = ["partition", "--profile", str(neutral(tmp_path)), "--gpus", "4", "--json"]
    bad = CliRunner().invoke(cli, [*base, "--stages", "3", "--data-parallel", "2"])
    assert bad.exit_code == 2 and "need 6 devices but --gpus is 4" in bad.stderr
    word = CliRunner().invoke(cli, [*base, "--data-parallel", "two"])
    assert word.exit_code == 2 and "neither 'auto' nor a positive number" in word.stderr


@pytest.mark.slow
def test_layouts_benchmark_quick_mode_writes_its_table(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "layouts.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "layouts.md").read_text()
    for layout in ("4 x 1", "2 x 2", "1 x 4"):
        assert layout in text
    assert "planner chose" in done.stdout.strip().splitlines()[-1]


def test_memory_per_device_rules_out_layouts_and_says_what_they_need() -> None:
    """Replicas hold whole stages: with a limit between a 2-stage and a 1-stage plan's memory
    only the pipeline fits, whatever the all-reduce would cost."""
    graph = chain(params=10_000, fwds=(0.01, 0.05))
    free = {(o.stages, o.replicas): o for o in choose_layout(graph, CostConfig(2, bandwidth=1e9), 2).options}
    split = free[(2, 1)].plan.summary["max_memory_bytes"]
    whole = free[(1, 2)].plan.summary["max_memory_bytes"]
    assert split < whole
    limit = (split + whole) // 2
    choice = choose_layout(graph, CostConfig(2, bandwidth=1e9, memory_limit=limit), 2)
    assert (choice.chosen.stages, choice.chosen.replicas) == (2, 1)
    replicated = next(o for o in choice.options if (o.stages, o.replicas) == (1, 2))
    assert replicated.plan is None and replicated.reason.startswith("over the memory limit: needs")
    lines = choice.table().splitlines()
    assert lines[0].split()[-1] == "note"
    assert any("1 x 2" in line and "over the memory limit: needs" in line for line in lines)
    # with every layout feasible the table has no note column (it was an empty one); the
    # numbers keep their format either way (tabulate re-read them as numbers without a "-" row)
    free_table = choose_layout(graph, CostConfig(2, bandwidth=1e9), 2).table()
    assert "note" not in free_table.splitlines()[0]
    for table in (free_table, choice.table()):
        row = next(line.lstrip("* ").split() for line in table.splitlines() if " 2 x 1 " in line)
        assert re.fullmatch(r"\d+\.\d\d", row[5]) and row[7] == "0.000", row  # mini-batches/s, all-reduce ms
    # a forced layout that does not fit: the error says only it was tried, and how to try others
    with pytest.raises(InfeasibleMemoryError, match=r"with --stages 1 is feasible .* or drop --stages 1 to"):
        choose_layout(graph, CostConfig(2, bandwidth=1e9, memory_limit=limit), 2, stages=1)
    # both forced, one layout tried: its own error, and the flags to drop (helper-119: not named)
    both = r"smallest feasible limit .* or drop --stages 1 --data-parallel 2 to let the planner try"
    with pytest.raises(InfeasibleMemoryError, match=both):
        choose_layout(graph, CostConfig(2, bandwidth=1e9, memory_limit=limit), 2, stages=1, replicas=2)
    with pytest.raises(PlanError, match="no layout of 2 devices is feasible"):
        choose_layout(graph, CostConfig(2, bandwidth=1e9, memory_limit=split // 2), 2)


def test_layout_table_says_whether_the_slowest_stage_or_the_shared_cores_set_the_rate() -> None:
    """Where ranks share cores, a layout's mini-batches/s is not 1 / its slowest stage: the
    table's ``set by`` column says which bound it, as each plan's summary does; without shared
    cores the column is left out."""
    graph = chain(params=10_000, fwds=(0.01, 0.05))
    choice = choose_layout(graph, CostConfig(2, bandwidth=1e9, cores=1), 2)
    lines = choice.table().splitlines()
    assert "set by" in lines[0]
    bound = {f"{o.stages} x {o.replicas}": o.plan.summary["cores_bound"] for o in choice.options}
    assert set(bound.values()) == {True, False}  # 1 x 1 by its stage, two ranks on one core by it
    for layout, cores in bound.items():
        line = next(line for line in lines if f" {layout} " in line)
        assert ("shared cores" in line, "slowest stage" in line) == (cores, not cores), line
    assert "set by" not in choose_layout(graph, CostConfig(2, bandwidth=1e9), 2).table().splitlines()[0]


def test_no_layout_fits_names_the_smallest_limit_and_its_layout() -> None:
    """The error's limit is the least any layout fits in: at it some layout plans, one byte
    under it none does."""
    graph = chain(params=10_000, fwds=(0.01, 0.05))
    free = choose_layout(graph, CostConfig(2, bandwidth=1e9), 2).options
    tight = min(o.plan.summary["max_memory_bytes"] for o in free) // 2
    with pytest.raises(InfeasibleMemoryError) as caught:
        choose_layout(graph, CostConfig(2, bandwidth=1e9, memory_limit=tight), 2)
    need = caught.value.min_feasible_bytes
    assert f"the smallest feasible limit is {format_bytes(need)} ({need} bytes) with " in str(caught.value)
    fits = choose_layout(graph, CostConfig(2, bandwidth=1e9, memory_limit=need), 2)
    assert fits.chosen.plan.summary["max_memory_bytes"] <= need
    named = str(caught.value).split(" bytes) with ")[1].split(" (stages")[0]
    assert f"{fits.chosen.stages} x {fits.chosen.replicas}" == named or any(
        f"{o.stages} x {o.replicas}" == named for o in fits.options if o.plan is not None
    )
    with pytest.raises(InfeasibleMemoryError):
        choose_layout(graph, CostConfig(2, bandwidth=1e9, memory_limit=need - 1), 2)


def stage_rows(table: str) -> tuple[list[str], list[list[str]]]:
    """The header and the stage rows of ``Plan.table()``, split on two or more spaces."""
    import re

    lines = table.splitlines()
    headers = re.split(r"\s{2,}", lines[0].strip())
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[2:] if line.strip()[:1].isdigit()]
    return headers, [r for r in rows if len(r) == len(headers)]


def test_stage_table_columns_add_up_to_the_stage_time_with_replicas() -> None:
    """Two replicas of one 20 kB stage spend 2·(R-1)/R · 20 kB / 1 GB/s = 20 µs on the ring
    all-reduce (Patarasuk and Yuan 2009): the row shows it, and fwd + bwd + update + comm +
    overhead + allreduce is the stage time."""
    graph = chain(params=10_000, fwds=(0.01, 0.05))
    replicated = choose_layout(graph, CostConfig(2, bandwidth=1e9), 2).chosen
    assert (replicated.stages, replicated.replicas) == (1, 2)
    headers, rows = stage_rows(replicated.plan.table())
    assert "allreduce ms" in headers and len(rows) == 1
    parts = ["fwd ms", "bwd ms", "update ms", "comm ms", "overhead ms", "allreduce ms"]
    for row in rows:
        cells = dict(zip(headers, row))
        assert float(cells["allreduce ms"]) == pytest.approx(2 * (2 - 1) / 2 * 20_000 / 1e9 * 1e3, abs=1e-3)
        assert sum(float(cells[k]) for k in parts) == pytest.approx(float(cells["stage ms"]), abs=4e-3)
    pipeline = choose_layout(graph, CostConfig(2, bandwidth=1e5), 2).chosen
    assert (pipeline.stages, pipeline.replicas) == (2, 1)
    assert "allreduce ms" not in stage_rows(pipeline.plan.table())[0]


@pytest.mark.parametrize(
    "args, line",
    [
        (["--gpus", "1"], "tiny: 8 nodes, 1 device, method"),
        (["--gpus", "2", "--data-parallel", "2"], "chosen layout   1 stage x 2 replicas (2 of 2 devices)"),
        (["--gpus", "2", "--stages", "2"], "chosen layout   2 stages x 1 replica (2 of 2 devices)"),
    ],
)
def test_cli_counts_are_singular_for_one(tmp_path: Path, args: list[str], line: str) -> None:
    result = CliRunner().invoke(cli, ["partition", "--profile", str(neutral(tmp_path)), *args])
    assert result.exit_code == 0, result.stderr
    assert line in result.stdout


def test_no_layout_with_too_few_rows_says_to_split_less() -> None:
    """64 micro-batches of an 8-row mini-batch: every layout has micro-batches of 0 rows, and
    the error said "raise --memory or --gpus", neither of which helps."""
    graph = chain(params=10_000, fwds=(0.01, 0.05))
    with pytest.raises(PlanError) as caught:
        choose_layout(lambda rows: graph, CostConfig(2, bandwidth=1e9), 2, micro_batches=64, mini_batch=8)
    text = str(caught.value)
    assert text.startswith("no layout of 2 devices is feasible (")
    assert text.endswith("): use a larger batch or fewer micro-batches"), text
    assert "--memory" not in text


@pytest.mark.parametrize(
    "replicas, fix",
    [(1, "fewer micro-batches (--micro-batches)"), (2, "fewer replicas or micro-batches")],
)
def test_a_forced_layout_with_too_few_rows_names_what_to_change(replicas: int, fix: str) -> None:
    """helper-98: 1f1b on 2 stages with --batch-size 1 advised "fewer replicas" with one replica
    and did not name the options."""
    graph = chain(params=10_000, fwds=(0.01, 0.05))
    config = CostConfig(2, method="1f1b", bandwidth=1e9)
    with pytest.raises(PlanError) as caught:
        choose_layout(lambda rows: graph, config, 2 * replicas, stages=2, replicas=replicas, mini_batch=1)
    assert str(caught.value) == (
        f"2 x {replicas} (stages x replicas) with 2 micro-batches each needs a mini-batch of at least "
        f"{2 * replicas} rows: use a larger batch (--batch-size) or {fix}"
    )
