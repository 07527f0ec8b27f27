"""The optimizer's update cost timed beside the other ranks stepping on this CPU's cores
(:func:`pipeoptim.update_cost.stepping_beside`, :func:`pipeoptim.runtime.linkcost.ranks_beside`)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeoptim.cli.main import cli
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.runtime import linkcost
from pipeoptim.runtime.linkcost import ranks_beside
from pipeoptim.update_cost import UpdateCostError, measure_update_cost, stepping_beside
from pipeoptim.update_cost_cache import load_or_measure_update_cost
from pipeoptim.update_pricing import UpdatePricing

MOMENTUM = {"lr": 0.1, "momentum": 0.9}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _beside_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pipeoptim-step-beside"]


def test_the_optimizers_beside_step_until_the_timing_ends() -> None:
    made: list[torch.optim.Optimizer] = []

    def make() -> torch.optim.Optimizer:
        made.append(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1000))], **MOMENTUM))
        return made[-1]

    with stepping_beside(2, make):
        assert len(_beside_threads()) == 2
        deadline = time.monotonic() + 30
        while not all(o.state for o in made) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(o.state for o in made)  # each has stepped: its momentum buffer exists
    assert _beside_threads() == []
    weights = [o.param_groups[0]["params"][0].detach().clone() for o in made]
    time.sleep(0.05)
    assert all(torch.equal(w, o.param_groups[0]["params"][0]) for w, o in zip(weights, made))  # stopped
    assert all(w.abs().sum() > 0 for w in weights)  # stepped away from zero along their gradients


def test_an_optimizer_failing_beside_is_reported() -> None:
    class Broken(torch.optim.SGD):
        def step(self, closure=None):  # torch's signature
            raise RuntimeError("no step here")

    failing = stepping_beside(1, lambda: Broken([torch.nn.Parameter(torch.zeros(4))], lr=0.1))
    with pytest.raises(UpdateCostError, match="stepping beside the timed one failed: no step here"), failing:
        time.sleep(0.05)
    assert _beside_threads() == []


def test_no_optimizer_beside_starts_no_thread() -> None:
    with stepping_beside(0, lambda: pytest.fail("made an optimizer")):
        assert _beside_threads() == []


@pytest.mark.parametrize(
    ("optimizer", "defaults"),
    [
        (torch.optim.SGD, MOMENTUM),
        (torch.optim.Adam, {"lr": 1e-3}),
        (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),  # its defaults hold more than it takes
        (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.9}),
    ],
)
def test_update_cost_beside_other_ranks_is_timed_and_stops_them(
    one_thread: None, optimizer: type[torch.optim.Optimizer], defaults: dict
) -> None:
    costs = measure_update_cost(optimizer, defaults, numel=1 << 14, tensors=4, repeats=3, beside=1)
    assert 0 < costs.step < 1e-6 and 0 < costs.copy < 1e-6
    assert 0 <= costs.predict < 1e-6  # what predicting adds to SGD's loop: at most noise on 64 KiB
    assert _beside_threads() == []


def test_update_cost_beside_needs_one_thread_on_the_cpu() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="one torch thread, not on cpu with 2 threads: pass beside=0"):
            measure_update_cost(torch.optim.SGD, MOMENTUM, numel=1024, beside=1)
    finally:
        torch.set_num_threads(before)


def test_update_costs_are_kept_per_ranks_beside(tmp_path: Path, one_thread: None) -> None:
    def measured(beside: int) -> tuple[float, ...]:
        return load_or_measure_update_cost(
            torch.optim.SGD, MOMENTUM, profile_dir=tmp_path, elements=(1 << 12, 2), beside=beside
        )

    alone = measured(0)
    measured(1)
    table = json.loads((tmp_path / "update-costs.json").read_text())
    assert sorted(json.loads(k)["beside"] for k in table) == [0, 1]
    assert measured(0) == alone  # each setting's own figures, reused


@pytest.mark.parametrize(
    ("ranks", "cores", "beside"), [(1, 2, 0), (2, 2, 1), (4, 2, 1), (4, 8, 3), (8, 4, 3)]
)
def test_ranks_beside_are_the_other_ranks_on_the_cores(
    monkeypatch: pytest.MonkeyPatch, one_thread: None, ranks: int, cores: int, beside: int
) -> None:
    monkeypatch.setattr(linkcost, "usable_cores", lambda: cores)
    assert ranks_beside(ranks, torch.device("cpu")) == beside


def test_no_ranks_beside_on_an_accelerator_or_with_more_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linkcost, "usable_cores", lambda: 16)
    assert ranks_beside(4, torch.device("cuda", 0)) == ranks_beside(4, "cuda") == 0
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert ranks_beside(4, torch.device("cpu")) == 0  # ranks of 4 threads each: timed alone
    finally:
        torch.set_num_threads(before)


def test_partition_times_the_update_beside_its_ranks(tmp_path: Path) -> None:
    args = ["partition", "mlp", "--gpus", "2", "--stages", "2", "--profile-dir", str(tmp_path)]
    result = CliRunner().invoke(
        cli, [*args, "--bandwidth", "10GB/s", "--latency", "0", "--action-overhead", "0"]
    )
    assert result.exit_code == 0, result.output
    (key,) = json.loads((tmp_path / "update-costs.json").read_text())
    assert json.loads(key)["beside"] == min(2, linkcost.usable_cores()) - 1


def test_each_layout_is_priced_beside_its_own_ranks(
    monkeypatch: pytest.MonkeyPatch, one_thread: None, tmp_path: Path
) -> None:
    monkeypatch.setattr(linkcost, "usable_cores", lambda: 4)
    pricing = UpdatePricing(torch.optim.SGD, MOMENTUM, torch.device("cpu"), (1 << 12, 2), tmp_path, print)
    config = CostConfig(num_stages=2)
    priced = {
        (n, r): pricing(dataclasses.replace(config, num_stages=n, data_parallel=r))
        for n, r in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 2)]
    }
    assert sorted(pricing.by_beside) == [0, 1, 3]  # 1, 2 and 4 ranks at once on the 4 cores
    for (n, r), layout in priced.items():
        costs = pricing.by_beside[min(n * r, 4) - 1]
        assert (layout.step_s_per_byte, layout.predict_s_per_byte, layout.copy_s_per_byte) == (
            costs.step,  # no clipping: without the pass over the gradients
            costs.predict,
            costs.copy,
        )
        assert (layout.num_stages, layout.data_parallel) == (n, r)
    table = json.loads((tmp_path / "update-costs.json").read_text())
    assert sorted(json.loads(k)["beside"] for k in table) == [0, 1, 3]


def test_an_optimizer_that_cannot_be_timed_is_said_once_and_left_out(tmp_path: Path) -> None:
    class Mine(torch.optim.Optimizer):  # no torch.optim base: never timed
        pass

    said: list[str] = []
    pricing = UpdatePricing(Mine, {}, torch.device("cpu"), (1024, 1), tmp_path, said.append)
    layouts = [pricing(CostConfig(num_stages=n)) for n in (1, 2)]
    assert all(c.step_s_per_byte == c.predict_s_per_byte == c.copy_s_per_byte == 0 for c in layouts)
    assert len(said) == 1 and "optimizer step cost not modelled in the plan: Mine derives from no" in said[0]
