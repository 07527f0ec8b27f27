"""The replicas' all-reduce priced at its own measured bandwidth, not the link's.

On loopback gloo an all-reduce of 8 MiB between two ranks took 4.4 ms of CPU against the
1.5 ms the link's bandwidth priced, and the layouts of 2 x 2 and 1 x 4 ranks ran at 0.59 and
0.49 of their prediction (helper-140). ``measure_allreduce`` times it; `pipeoptim train` and
`pipeoptim partition` measure it with the bandwidth; ``compile(allreduce_bandwidth=...)`` takes
it as given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import pipeoptim
import pipeoptim.cli.options as options
from pipeoptim.cli.main import cli
from pipeoptim.cli.options import link_figures
from pipeoptim.machine_costs import MachineCosts
from pipeoptim.runtime.linkcost import measure_allreduce, measure_link

#: the machine's figures the tests pretend were measured: a link of 5 GB/s, an all-reduce of 1.5
FIGURES = MachineCosts(latency=1e-4, bandwidth=5e9, action_overhead=6e-4, allreduce_bandwidth=1.5e9)


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``load_or_measure_machine_costs`` gives :data:`FIGURES`; the list counts the calls."""
    calls: list[int] = []

    def measure(**_kwargs) -> MachineCosts:
        calls.append(1)
        return FIGURES

    monkeypatch.setattr(options, "load_or_measure_machine_costs", measure)
    return calls


def test_the_allreduce_is_measured_with_the_bandwidth_and_else_is_the_bandwidths(measured: list[int]) -> None:
    said: list[str] = []
    figures = link_figures("measure", "measure", "measure", said.append)
    assert figures == (5e9, 1e-4, 6e-4, 1.5e9)
    # a bandwidth given: the all-reduce is priced at it (None), even where latency is measured
    assert link_figures(2e9, "measure", 0.0, said.append) == (2e9, 1e-4, 0.0, None)
    assert link_figures(2e9, 0.0, 0.0, said.append) == (2e9, 0.0, 0.0, None)
    assert len(measured) == 2
    # stages that are not CPU workers: nothing measured, the plain defaults
    figures = link_figures("measure", "measure", "measure", said.append, "the stages run on GPUs")
    assert figures == (25e9, 0.0, 0.0, None) and len(measured) == 2


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def test_compile_prices_the_replicas_allreduce_at_the_bandwidth_given(tmp_path: Path) -> None:
    """One stage, 2 replicas, a model of 2,372 float32 parameters (9,488 bytes: one bucket, so
    nothing overlaps the backward): the stage's all-reduce is the ring's 2(R-1)/R = 1 x its
    bytes at the all-reduce's bandwidth plus 2(R-1) = 2 messages of the link's latency."""
    net = model()
    params = sum(p.numel() * 4 for p in net.parameters())
    assert params == 9488
    common = dict(
        example_inputs=torch.randn(8, 32),
        loss_fn=F.cross_entropy,
        executor="local",
        profile_dir=tmp_path,
        data_parallel=2,
        bandwidth=4e9,
        latency=1e-5,
    )
    for given, priced in ((1e8, 1e8), (None, 4e9)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with pipeoptim.compile(net, opt, 2, allreduce_bandwidth=given, **common) as pipe:
            stage = pipe.plan.stages[0]
            assert pipe.plan.config.allreduce_bandwidth == given
        assert stage.allreduce_s == pytest.approx(params / priced + 2 * 1e-5, rel=1e-12)
    with pytest.raises(ValueError, match="bandwidth"):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        pipeoptim.compile(net, opt, 2, allreduce_bandwidth="fast", **common)


def test_partition_plans_replicas_with_the_measured_allreduce(tmp_path: Path, measured: list[int]) -> None:
    def allreduce_ms(*given: str) -> float:
        args = ["partition", "mlp", "--gpus", "2", "--stages", "1", "--data-parallel", "2", "--json"]
        result = CliRunner().invoke(cli, [*args, "--profile-dir", str(tmp_path), *given])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        return plan["stages"][0]["allreduce_s"], plan["stages"][0]["param_bytes"]

    seconds, params = allreduce_ms("--bandwidth", "measure", "--latency", "0")
    assert seconds == pytest.approx(params / 1.5e9, rel=1e-9)
    seconds, params = allreduce_ms("--bandwidth", "3GB/s", "--latency", "0")
    assert seconds == pytest.approx(params / 3e9, rel=1e-9)
    assert len(measured) == 1


@pytest.mark.slow
def test_train_prices_replicas_with_the_measured_allreduce(tmp_path: Path, measured: list[int]) -> None:
    args = ["train", "digits", "--gpus", "2", "--stages", "1", "--data-parallel", "2", "--epochs", "1"]
    args += ["--limit", "64", "--quiet", "--out", str(tmp_path / "run"), "--profile-dir", str(tmp_path / "p")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["allreduce_bandwidth"] == 1.5e9
    (stage,) = metrics["stages"]
    ring = stage["param_bytes"] / 1.5e9 + 2 * 1e-4  # one bucket: the digits CNN holds 0.1 MB
    assert stage["allreduce_s"] == pytest.approx(ring, rel=1e-9)


@pytest.mark.slow
def test_a_measured_allreduce_is_a_bandwidth_and_slower_than_sends() -> None:
    """On the CPU gloo's all-reduce reduces and copies on the ranks' cores: its bandwidth is
    plausible and not above the sends' (4-5x below on the project's 2-core machines); a size
    that is no number of float32 elements is refused before any process starts."""
    bandwidth = measure_allreduce(repeats=5, timeout=120)
    assert 1e7 < bandwidth < 1e12
    _, beta = measure_link(sizes=(4 << 10, 8 << 20), repeats=5, timeout=120)
    assert bandwidth < 1.5 / beta
    for size, repeats in ((6, 3), (0, 3), (4096, 0)):
        with pytest.raises(ValueError, match="positive multiple of 4 bytes"):
            measure_allreduce(size=size, repeats=repeats)
