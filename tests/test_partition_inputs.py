"""What surrounds a plan: bad cost-graph files, clean JSON on stdout, the smallest memory limit."""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeoptim.cli.main import cli
from pipeoptim.compiler import partition as P
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.errors import InfeasibleMemoryError

from .conftest import random_cost_graph

EXE = Path(sys.executable).parent / "pipeoptim"


def neutral_graph() -> dict:
    """A small cost graph in the neutral format: input, 6 layers with a skip, output."""
    nodes = [
        {
            "name": "x",
            "op": "placeholder",
            "target": "x",
            "inputs": [],
            "fwd_s": 0.0,
            "bwd_s": 0.0,
            "out_bytes": 4096,
            "param_bytes": 0,
        }
    ]
    for i in range(6):
        inputs = [nodes[-1]["name"]] + (["layer1"] if i == 4 else [])
        nodes.append(
            {
                "name": f"layer{i}",
                "op": "call_module",
                "target": f"layer{i}",
                "inputs": inputs,
                "fwd_s": 0.001 * (i + 1),
                "bwd_s": 0.002 * (i + 1),
                "out_bytes": 4096 * (6 - i),
                "param_bytes": 1000 * (i + 1) ** 2,
                "params": [f"layer{i}.weight"],
                "module": f"layer{i}",
                "module_type": "Linear",
            }
        )
    nodes.append(
        {
            "name": "output",
            "op": "output",
            "target": "output",
            "inputs": ["layer5"],
            "fwd_s": 0.0,
            "bwd_s": 0.0,
            "out_bytes": 0,
            "param_bytes": 0,
        }
    )
    return {
        "format": "pipeoptim-neutral-cost-graph/1",
        "model": "tiny",
        "batch_size": 8,
        "device": "test device",
        "torch": "0",
        "nodes": nodes,
    }


def edited(change) -> dict:
    data = neutral_graph()
    change(data)
    return data


def set_node(i: int, **fields):
    return lambda d: d["nodes"][i].update(fields)


BAD_FILES = {
    "empty": (b"", "is empty"),
    "truncated": (json.dumps(neutral_graph()).encode()[:300], "not valid JSON"),
    "list": (b"[1, 2]", "top level is a JSON array"),
    "no schema": (b'{"nodes": []}', "neither a profile"),
    "old schema": (b'{"schema": "pipeoptim-profile/0"}', "schema 'pipeoptim-profile/0' is not"),
    "not utf-8": (b"\xff", "not UTF-8"),
    "format 2": (
        json.dumps({**neutral_graph(), "format": "pipeoptim-neutral-cost-graph/2"}).encode(),
        "format 'pipeoptim-neutral-cost-graph/2' is not supported",
    ),
    "no output": (
        json.dumps(edited(lambda d: d["nodes"].pop())).encode(),
        "no node with op 'output'",
    ),
    "a node after the output": (  # planned as work (helper-129)
        json.dumps(edited(lambda d: d["nodes"].append({**d["nodes"][-2], "name": "late"}))).encode(),
        "must be its last, but node 'late' comes after it",
    ),
    "nan time": (json.dumps(edited(set_node(2, fwd_s=float("nan")))).encode(), "'layer1' has fwd_s = nan"),
    "negative time": (json.dumps(edited(set_node(3, bwd_s=-0.5))).encode(), "'layer2' has bwd_s = -0.5"),
    "infinite size": (json.dumps(edited(set_node(3, out_bytes=1e400))).encode(), "'layer2' is malformed"),
    "huge time": (  # planned as if valid (exit 0)
        json.dumps(edited(set_node(2, fwd_s=1e308))).encode(),
        "'layer1' has fwd_s = 1e+308; times must be seconds from 0 to 3600",
    ),
    "huge size": (  # an OverflowError traceback
        json.dumps(edited(set_node(3, out_bytes=1e30))).encode(),
        "and sizes whole bytes from 0 to 1e+18",
    ),
    "batch size text": (  # read as 8
        json.dumps(edited(lambda d: d.update(batch_size="8"))).encode(),
        "batch_size '8' is not a positive whole number",
    ),
    "fractional batch size": (
        json.dumps(edited(lambda d: d.update(batch_size=8.7))).encode(),
        "batch_size 8.7 is not a positive whole number",
    ),
    "all zero": (
        json.dumps(
            edited(lambda d: [n.update(fwd_s=0, bwd_s=0, param_bytes=0) for n in d["nodes"]])
        ).encode(),
        "nothing to place",
    ),
    "zero times": (  # planned, "bottleneck 0.545 ms, balance ratio 1.000 (lower bound 0)"
        json.dumps(edited(lambda d: [n.update(fwd_s=0, bwd_s=0) for n in d["nodes"]])).encode(),
        "every node has zero forward and backward time",
    ),
    "size as text": (  # read as 12 by float()
        json.dumps(edited(set_node(3, out_bytes="12"))).encode(),
        "'layer2' is malformed (out_bytes = '12' is not a number)",
    ),
    "time as true": (  # read as 1.0 s
        json.dumps(edited(set_node(2, fwd_s=True))).encode(),
        "'layer1' is malformed (fwd_s = True is not a number)",
    ),
    "inputs as text": (  # list("x") named one input per character
        json.dumps(edited(set_node(2, inputs="x"))).encode(),
        "'layer1' is malformed (inputs = 'x' is not a list)",
    ),
    "missing key": (
        json.dumps(edited(lambda d: d["nodes"][2].pop("bwd_s"))).encode(),
        "'layer1' has no 'bwd_s'",
    ),
}


@pytest.mark.parametrize("case", [*BAD_FILES, "missing file"])
def test_bad_profile_file_is_one_line_and_exit_code_1(tmp_path: Path, case: str) -> None:
    path = tmp_path / "graph.json"
    if case == "missing file":
        message = "No such file or directory"
    else:
        content, message = BAD_FILES[case]
        path.write_bytes(content)
    result = CliRunner().invoke(cli, ["partition", "--profile", str(path), "--gpus", "2"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]


def test_a_profile_with_a_fraction_of_a_byte_is_refused(tmp_path: Path) -> None:
    """A saved profile's sizes go through no byte check of the neutral reader: 1.5 parameter
    bytes were planned, a fractional stage memory in the table (helper-136)."""
    (tmp_path / "graph.json").write_text(json.dumps(neutral_graph()))
    CostGraph.load(tmp_path / "graph.json").save(tmp_path / "profile.json")
    data = json.loads((tmp_path / "profile.json").read_text())
    data.pop("content_hash", None)
    data["nodes"][2]["param_bytes"] = 1.5
    data["info"] |= {"static_batch": True, "dynamic_length": False}  # as a measured profile's
    (tmp_path / "profile.json").write_text(json.dumps(data))
    result = CliRunner().invoke(
        cli, ["partition", "--profile", str(tmp_path / "profile.json"), "--gpus", "2"]
    )
    assert result.exit_code == 1 and "has param_bytes = 1.5; times must be seconds" in result.stderr


def test_the_tiny_graph_itself_plans(tmp_path: Path) -> None:
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(neutral_graph()))
    result = CliRunner().invoke(
        cli, ["partition", "--profile", str(path), "--gpus", "3", "--stages", "3", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["stages"]) == 3


@pytest.mark.parametrize(
    "solver, memory", [("dp", None), ("auto", None), ("cbc", None), ("highs", "least"), ("cbc", "least")]
)
def test_json_on_stdout_is_the_only_output(tmp_path: Path, solver: str, memory: str | None) -> None:
    """Run as a user does (a process, so that what C libraries print to file descriptor 1 is seen)."""
    if solver == "highs":
        pytest.importorskip("highspy")
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(neutral_graph()))
    args = [str(EXE), "partition", "--profile", str(path), "--gpus", "3", "--stages", "3", "--json"]
    args += [] if solver == "dp" else ["--solver", solver, "--no-exact-dp"]
    if memory:  # a limit only a non-contiguous or least-memory plan meets runs the memory ILP too
        least = P.min_memory_plan(CostGraph.load(path), CostConfig(3, bandwidth=25e9, micro_batches=3))
        args += ["--memory", str(least.memory_bytes)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert len(data["stages"]) == 3
    assert data["solver"] == {"dp": "dp over ideals", "auto": "highs"}.get(solver, solver)
    if memory:
        assert data["max_memory_bytes"] <= data["config"]["memory_limit"]


def test_what_a_users_model_prints_goes_to_stderr_under_json(tmp_path: Path) -> None:
    """A factory, module or forward that prints came before the JSON on stdout (helper-157)."""
    (tmp_path / "talking.py").write_text(
        "import torch\nfrom torch import nn\nprint('imported')\n\n\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)\n\n"
        "    def forward(self, x):\n        print('forward')\n"
        "        return self.b(torch.relu(self.a(x)))\n\n\n"
        "def make():\n    print('factory')\n    return Net(), (torch.randn(4, 8),)\n"
    )
    args = [str(EXE), "partition", "talking.py:make", "--gpus", "2", "--stages", "2", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_stages"] == 2
    assert "imported" in done.stderr and "factory" in done.stderr and "forward" in done.stderr


def test_a_file_given_as_the_profile_folder_is_named_a_file(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("not a folder\n")
    result = CliRunner().invoke(
        cli, ["partition", "mlp", "--gpus", "2", "--profile-dir", str(tmp_path / "notes.md")]
    )
    assert result.exit_code == 1
    assert (
        f"the profile folder {tmp_path / 'notes.md'} is a file, not a folder: choose a folder for "
        "--profile-dir" in result.stderr
    )


def reference_min_memory(graph: CostGraph, n: int, opt_factor: float) -> int:
    """Brute force, written from the cost model's memory formula: per stage k of N under
    PipeOptim, params * (weights + gradient + optimizer state + predicted copy, none at the
    last stage, whose version difference is 0) + (N - k) micro-batches of saved activations;
    the least over every assignment in which no edge runs backwards and every stage has a
    node that does work."""
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    free = [i for i, node in enumerate(graph.nodes) if node.op not in ("placeholder", "output")]
    best = None
    for assign in itertools.product(range(n), repeat=len(free)):
        stage = [0] * len(graph.nodes)
        for i, s in zip(free, assign):
            stage[i] = s
        stage[-1] = n - 1  # the output node is last in these graphs
        if any(stage[index[src]] > stage[i] for i, node in enumerate(graph.nodes) for src in node.inputs):
            continue
        if {stage[i] for i in free} != set(range(n)):
            continue
        peak = 0
        for k in range(n):
            members = [graph.nodes[i] for i in range(len(graph.nodes)) if stage[i] == k]
            params = sum(m.param_bytes for m in members)
            saved = sum(m.saved_bytes for m in members)
            copies = 1 if k < n - 1 else 0
            peak = max(peak, params * (1 + 1 + opt_factor + copies) + (n - k) * saved)
        best = peak if best is None else min(best, peak)
    assert best is not None
    return int(best)


@pytest.mark.parametrize("ideals", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_smallest_memory_limit_is_exact(seed: int, ideals: bool) -> None:
    rng = random.Random(seed)
    graph = random_cost_graph(rng, 6, max_inputs=2)
    n = rng.choice([2, 3])
    config = CostConfig(n, bandwidth=500.0, memory_limit=1)
    with pytest.raises(InfeasibleMemoryError) as info:
        P.ilp(graph, config, max_units=1000, gap=1e-9, ideals=ideals)
    least = info.value.min_feasible_bytes
    assert least == reference_min_memory(graph, n, config.opt_state_factor)
    assert f"({least} bytes, proven" in str(info.value)
    at = CostConfig(n, bandwidth=500.0, memory_limit=least)
    plan = P.ilp(graph, at, max_units=1000, gap=1e-9, ideals=ideals)
    assert max(s.memory_bytes for s in evaluate(graph, plan.stage_of, at)) <= least
    with pytest.raises(InfeasibleMemoryError) as below:
        P.ilp(graph, CostConfig(n, bandwidth=500.0, memory_limit=least - 1), max_units=1000, ideals=ideals)
    assert below.value.min_feasible_bytes == least


@pytest.mark.parametrize(
    "name, stages, ideals",
    [("alexnet", 4, True), ("alexnet", 4, False), ("inception_v3", 8, True), ("resnet101", 4, True)],
)
def test_smallest_memory_limit_of_gpu_graphs_plans_and_one_byte_less_does_not(
    shared_dir: Path, name: str, stages: int, ideals: bool
) -> None:
    """alexnet with 4 stages named 846,798,846 bytes, which failed, where 846,798,848 planned
    (then: a predicted copy counted at the last stage too; without it the minimum is
    714,571,488 bytes)."""
    graph = CostGraph.load(shared_dir / "profiles" / f"{name}.json")
    base = CostConfig(stages, bandwidth=25e9, micro_batches=stages)
    with pytest.raises(InfeasibleMemoryError) as info:
        P.ilp(
            graph, CostConfig(stages, bandwidth=25e9, micro_batches=stages, memory_limit=2**20), ideals=ideals
        )
    least = info.value.min_feasible_bytes
    assert least == P.min_memory_plan(graph, base, ideals=ideals).memory_bytes
    at = CostConfig(stages, bandwidth=25e9, micro_batches=stages, memory_limit=least)
    plan = P.ilp(graph, at, ideals=ideals)
    assert max(s.memory_bytes for s in evaluate(graph, plan.stage_of, at)) <= least
    with pytest.raises(InfeasibleMemoryError) as below:
        P.ilp(
            graph,
            CostConfig(stages, bandwidth=25e9, micro_batches=stages, memory_limit=least - 1),
            ideals=ideals,
        )
    assert below.value.min_feasible_bytes == least
    if name == "alexnet":
        assert least == 714_571_488


@pytest.mark.parametrize("ideals", [False, True])
def test_status_says_optimal_over_units_when_coarsened(ideals: bool) -> None:
    """A wide graph (too many ideals at node level) placed as at most 12 units."""
    graph = random_cost_graph(random.Random(2), 60, max_inputs=3)
    config = CostConfig(3, bandwidth=500.0)
    coarse = P.ilp(graph, config, max_units=12, ideals=ideals)
    assert coarse.num_units <= 12 and coarse.solver == (P.IDEALS if ideals else "highs")
    assert coarse.status == f"optimal over {coarse.num_units} units" and coarse.optimal
    fine = P.ilp(random_cost_graph(random.Random(2), 10), config, max_units=1000, ideals=ideals)
    assert fine.status == "optimal" and fine.optimal


def test_plot_draws_the_plan(tmp_path: Path) -> None:
    import matplotlib.image

    from pipeoptim.compiler.plan import make_plan
    from pipeoptim.compiler.plot import stage_starts

    path = tmp_path / "graph.json"
    path.write_text(json.dumps(neutral_graph()))
    picture = tmp_path / "out" / "plan.png"
    result = CliRunner().invoke(
        cli,
        [
            "partition",
            "--profile",
            str(path),
            "--gpus",
            "3",
            "--stages",
            "3",
            "--plot",
            str(picture),
            "--memory",
            "1GiB",
        ],
    )
    assert result.exit_code == 0, result.stderr
    height, width, _channels = matplotlib.image.imread(picture).shape
    assert height > 500 and width > 500
    assert [p.name for p in picture.parent.iterdir()] == ["plan.png"]  # written atomically, nothing left
    graph = CostGraph.load(path)
    plan = make_plan(graph, CostConfig(3, bandwidth=25e9))
    starts = stage_starts(plan, graph)
    work = [n.time_s for n in graph.nodes]
    for stage, share, label in starts:
        first = next(i for i, n in enumerate(graph.nodes) if plan.stage_of[n.name] == stage and n.time_s > 0)
        assert label == graph.nodes[first].module
        assert share == pytest.approx(sum(work[:first]) / sum(work))
    assert [s for s, _, _ in starts] == [0, 1, 2] and starts[0][1] == 0.0
    bad = CliRunner().invoke(
        cli, ["partition", "--profile", str(path), "--gpus", "2", "--plot", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "is a directory" in bad.stderr


def test_train_plot_includes_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "train",
        "digits",
        "--gpus",
        "2",
        "--stages",
        "2",
        "--epochs",
        "1",
        "--limit",
        "64",
        "--test-limit",
        "32",
    ]
    args += ["--executor", "local", "--plot", "--quiet", "--out", str(out), "--profile-dir", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "curves.png").is_file()


def test_cli_names_the_smallest_memory_limit_and_plans_at_it(tmp_path: Path) -> None:
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(neutral_graph()))
    args = ["partition", "--profile", str(path), "--gpus", "3", "--stages", "3", "--json", "--memory"]
    failed = CliRunner().invoke(cli, [*args, "1KiB"])
    assert failed.exit_code == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "smallest feasible limit" in lines[0], failed.stderr
    least = int(re.search(r"\((\d+) bytes, proven", lines[0]).group(1))
    fits = CliRunner().invoke(cli, [*args, str(least)])
    assert fits.exit_code == 0, fits.stderr
    assert json.loads(fits.stdout)["max_memory_bytes"] == least
    below = CliRunner().invoke(cli, [*args, str(least - 1)])
    assert below.exit_code == 1 and f"({least} bytes, proven" in below.stderr
