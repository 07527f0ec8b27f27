"""CPU ranks bound to cores of their own (pipeoptim.runtime.affinity)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import pipeoptim
from pipeoptim.examples import mlp
from pipeoptim.runtime import affinity
from pipeoptim.runtime.affinity import AFFINITY_ENV, binding_wanted, rank_cores

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")


@pytest.mark.parametrize(
    "world, cores, expected",
    [
        (2, [0, 1], [[0], [1]]),
        (4, [0, 1], [[0], [1], [0], [1]]),  # more ranks than cores: in turn
        (2, range(8), [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (3, range(8), [[0, 1], [2, 3], [4, 5]]),  # equal blocks; cores 6 and 7 left
        (2, {7, 2, 5}, [[2], [5]]),  # the cores this process may use, in order
        (1, [3], [[3]]),
    ],
)
def test_each_rank_gets_an_equal_block_or_a_core_in_turn(world: int, cores, expected) -> None:
    assert [rank_cores(r, world, cores) for r in range(world)] == expected


@pytest.mark.parametrize("rank, world, cores", [(2, 2, [0, 1]), (-1, 2, [0, 1]), (0, 2, [])])
def test_no_cores_for_a_rank_outside_the_world_is_an_error(rank: int, world: int, cores) -> None:
    with pytest.raises(ValueError, match="nothing to bind to"):
        rank_cores(rank, world, cores)


def _worker_cores(monkeypatch: pytest.MonkeyPatch, setting: str | None) -> list[set[int]]:
    if setting is None:
        monkeypatch.delenv(AFFINITY_ENV, raising=False)
    else:
        monkeypatch.setenv(AFFINITY_ENV, setting)
    model, x = mlp(batch=8, width=16, depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.randint(0, 10, (8,))
    with pipeoptim.compile(
        model,
        opt,
        2,
        example_inputs=x,
        loss_fn=F.cross_entropy,
        executor="processes",
        profile_dir=None,
        timeout=60,
    ) as pipe:
        pipe.step(x, y)
        pipe.flush()
        return [os.sched_getaffinity(p.pid) for p in pipe._executor.processes]


@pytest.mark.skipif(not binding_wanted(), reason="this process is held to some cores already")
def test_worker_processes_run_on_their_own_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = os.sched_getaffinity(0)
    assert _worker_cores(monkeypatch, None) == [set(rank_cores(r, 2, mine)) for r in range(2)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to hold a process to")
def test_a_process_held_to_some_cores_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a launcher that binds each rank (taskset, numactl, SLURM) would leave it: binding
    again would give rank 1 of 2 on cores {4, 5} core 5 alone. The workers take the driver's
    cores, not those of the fork server they come from (started at full affinity by an
    earlier test, it made them bind)."""
    mine = os.sched_getaffinity(0)
    held = {min(mine)}
    os.sched_setaffinity(0, held)
    try:
        assert not binding_wanted()
        assert _worker_cores(monkeypatch, None) == [held, held]
    finally:
        os.sched_setaffinity(0, mine)


@pytest.mark.parametrize("setting", ["off", "0"])
def test_the_binding_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    mine = os.sched_getaffinity(0)
    assert _worker_cores(monkeypatch, setting) == [mine, mine]


@pytest.mark.parametrize("value", ["garbage", "disable", "none"])
def test_a_setting_neither_on_nor_off_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """Any other value meant "on" without a word."""
    with pytest.raises(ValueError, match=f"PIPEOPTIM_CPU_AFFINITY='{value}' is neither on nor off"):
        _worker_cores(monkeypatch, value)


class _Untraceable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model is never traced")


def test_a_setting_neither_on_nor_off_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was raised as the workers started, after tracing, profiling and planning (a model
    that cannot be traced met its TraceError first)."""
    monkeypatch.setenv(AFFINITY_ENV, "garbage")
    model = _Untraceable()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="PIPEOPTIM_CPU_AFFINITY='garbage' is neither on nor off"):
        pipeoptim.compile(
            model,
            opt,
            2,
            example_inputs=torch.randn(4, 4),
            loss_fn=F.mse_loss,
            executor="processes",
            profile_dir=None,
        )


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="binds cores")
def test_a_bound_rank_plans_for_the_cores_all_ranks_share() -> None:
    """A torchrun rank is bound to its core before it compiles: it still prices the ranks on
    every core of the host (it priced 2 ranks on 2 cores as sharing 1, and its plan differed
    from the same job's in one process), and the helper threads it starts to time the optimizer
    beside it run on those cores, not on its own."""
    import threading

    from pipeoptim.runtime.affinity import pin_rank, ranks_bound, unbind_thread, unpin_rank
    from pipeoptim.runtime.linkcost import usable_cores

    if not binding_wanted():
        pytest.skip("this process is held to some cores already")
    host = os.sched_getaffinity(0)
    try:
        assert pin_rank(0, 2) is not None
        assert len(os.sched_getaffinity(0)) < len(host)
        assert usable_cores() == len(host)
        # and prices the ranks as bound in turn (binding_wanted reads its own core as another's
        # binding: helper-142)
        assert ranks_bound() and not binding_wanted()
        seen: list[set[int]] = []

        def helper() -> None:
            unbind_thread()
            seen.append(os.sched_getaffinity(0))

        thread = threading.Thread(target=helper)
        thread.start()
        thread.join()
        assert seen == [host] and len(os.sched_getaffinity(0)) < len(host)  # the rank stays bound
    finally:
        unpin_rank()
    assert os.sched_getaffinity(0) == host


@pytest.mark.parametrize("world, cores, spare", [(2, {0, 1}, True), (4, {0, 1}, False), (1, {5}, True)])
def test_ranks_have_cores_to_spare_where_none_shares_one(monkeypatch, world: int, cores, spare: bool) -> None:
    """Stage 0 under torchrun runs the next step's work in its wait only then (worker.py)."""
    monkeypatch.setattr(affinity, "host_cores", lambda: set(cores))
    assert affinity.cores_to_spare(world) is spare
    monkeypatch.setattr(affinity, "host_cores", lambda: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert affinity.cores_to_spare(2) and not affinity.cores_to_spare(3)
