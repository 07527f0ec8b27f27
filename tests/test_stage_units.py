"""Unit tests of the stage runtime (``stage.py``), the channel helpers (``comm.py``) and the
worker's command dispatch (``worker.py``), each driven directly rather than end to end."""

from __future__ import annotations

import copy
import datetime
import re
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.errors import PipelineError, PipelineStalledError
from pipeoptim.microbatch import Rows
from pipeoptim.runtime import distributed, spawning, wire, worker
from pipeoptim.runtime.executor import MiniBatch
from pipeoptim.runtime.layout import rebuild, shape_for
from pipeoptim.runtime.optim import hyperparameters
from pipeoptim.runtime.schedule import schedule_for
from pipeoptim.runtime.stage_state import stage_state


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def plain_steps(model: nn.Module, batches: list, scale: float = 1.0) -> tuple[list[float], dict]:
    """Plain PyTorch: one forward, backward (of ``scale · loss``) and SGD step per batch."""
    model = copy.deepcopy(model)
    opt = sgd(model)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss * scale).backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def test_stage_runtimes_driven_by_hand_equal_plain_training() -> None:
    """Two stages: forward, forward with the loss, backward, backward, step, step — the
    operations a schedule orders — give the plain model's loss and weights (to 1e-6), and
    each stage holds a micro-batch exactly between its forward and its backward."""
    model = mlp()
    x, _ = batch()
    with pipeoptim.compile(
        model, sgd(model), 2, example_inputs=x, loss_fn=F.cross_entropy, method="1f1b",
        executor="local", profile_dir=None,
    ) as pipe:  # fmt: skip
        first, last = pipe._executor.stages
        hyper = hyperparameters(sgd(model))
        losses = []
        for step, (xs, ys) in enumerate([batch(3), batch(4), batch(5)]):
            for stage in (first, last):
                stage.set_hyperparameters(step, hyper)
            sent = first.forward(step, (xs,), None, 0, 0.5, step)
            assert (first.in_flight, last.in_flight) == (1, 0)
            losses.append(float(last.forward(step, sent, ys, 0, 0.5, step)))
            assert last.in_flight == 1
            grads = last.backward(step)
            assert last.in_flight == 0 and len(grads) == len(sent)
            assert first.backward(step, grads) is not None
            assert first.in_flight == 0
            first.step(step)
            last.step(step)
        weights = stage_state([first, last])
    want_losses, want = plain_steps(model, [batch(3), batch(4), batch(5)], scale=0.5)
    assert losses == pytest.approx(want_losses, abs=1e-6)
    assert set(weights) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6)


def test_shape_for_scales_the_batch_dim_and_follows_the_sequence_length() -> None:
    meta = {"shape": [4, 10, 32], "batch_dim": 0, "length": {"at": 10, "slopes": [0, 1, 0]}}
    assert shape_for(meta, 4, 4) == [4, 10, 32]
    assert shape_for(meta, 4, 2) == [2, 10, 32]
    assert shape_for(meta, 4, Rows(3, length=7)) == [3, 7, 32]
    assert shape_for({"shape": [5, 2], "batch_dim": None}, 4, 2) == [5, 2]  # no batch dim


def test_rebuild_restores_tuples_lists_and_single_values() -> None:
    plan = SimpleNamespace(
        values={
            "a": {"meta": [{}], "container": ""},
            "b": {"meta": [{}, {}], "container": "tuple"},
            "c": {"meta": [{}, {}], "container": "list"},
        }
    )
    assert rebuild(plan, ["a", "b", "c"], [1, 2, 3, 4, 5]) == (1, (2, 3), [4, 5])


def test_worker_dispatch_serves_every_command_the_process_executor_sends() -> None:
    source = Path(distributed.__file__).read_text()
    sent = set(re.findall(r'_request\(\s*"(\w+)"', source)) | set(re.findall(r'_send\(\w+, "(\w+)"', source))
    assert {"batch", "flush", "eval", "state", "load_state", "resume"} <= sent
    assert sent <= set(worker.COMMANDS)
    with pytest.raises(ValueError, match="unknown command 'nope'"):
        worker._serve(SimpleNamespace(), "nope", None)


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank (this process), destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{distributed.free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_stage_process_through_the_dispatch_table_equals_the_local_executor(one_rank_group) -> None:
    """A one-stage worker served command by command (batch, flush, eval, state, optimizer
    state) computes what the local executor computes for the same mini-batches."""
    model = mlp()
    x, _ = batch()
    with pipeoptim.compile(
        model, sgd(model), 1, example_inputs=x, loss_fn=F.cross_entropy, method="1f1b",
        executor="local", profile_dir=None,
    ) as pipe:  # fmt: skip
        spec = spawning.unpickle_spec(spawning.pickle_spec(pipe.spec))  # what a spawned worker gets
        process = worker.StageProcess(spec, 0, torch.device("cpu"), timeout=60.0)
        hyper = hyperparameters(sgd(model))
        losses = []
        for index, seed in enumerate((3, 4, 5)):
            xs, ys = batch(seed)
            mini = MiniBatch(index, [(xs,)], [ys], [1.0], [Rows(8)], hyper)
            losses += worker._serve(process, "batch", wire.dumps(mini))  # as the driver sends it
            losses += worker._serve(process, "flush", None)
            assert float(pipe.step(xs, ys)) == pytest.approx(losses[-1][1], abs=1e-6)
        assert [mb for mb, _ in losses] == [0, 1, 2]
        served = worker._serve(process, "state", None)
        local = pipe.state_dict()
        assert set(served) == set(local)
        for name, value in local.items():
            torch.testing.assert_close(served[name], value, rtol=0, atol=1e-6)
        xs, _ = batch(9)
        (out,) = cloudpickle.loads(worker._serve(process, "eval", ([(xs,)], [Rows(8)])))
        torch.testing.assert_close(out[0], pipe.predict(xs), rtol=0, atol=1e-6)
        assert worker._serve(process, "optimizer_state", None)["steps"] == {0: 3}
    want_losses, _ = plain_steps(model, [batch(3), batch(4), batch(5)])
    assert [v for _, v in losses] == pytest.approx(want_losses, abs=1e-6)


@pytest.mark.parametrize(
    "stage, method, mini_batch, order",
    [
        (0, "1f1b", 0, "F0 F1 side B0 B1 S0"),  # before the round trip through stage 1
        (1, "1f1b", 0, "F0 B0 F1 B1 S0 side"),  # the last stage waits for no gradients
        (0, "async-1f1b", 0, "F0 side"),  # a warm-up without a backward
        (0, "async-1f1b", 1, "F1(s=1) side B0 S0"),
    ],
)
def test_side_work_runs_where_the_stage_waits(monkeypatch, stage, method, mini_batch, order) -> None:
    """An executor's bookkeeping of a mini-batch (under torchrun: posting the loss receives)
    runs before the stage's first backward that waits for another stage's gradients, where
    the stage is idle anyway, else after its last action."""
    done: list[str] = []
    monkeypatch.setattr(worker, "run_action", lambda stage_, action, *_: done.append(str(action)))
    channel = SimpleNamespace(
        prefetch=lambda *_: None, end_action=lambda: None, arrived_at=0.0, done=lambda _: None
    )
    process = SimpleNamespace(
        rank=stage, world=2, reducer=None, stage=None, state=None, channel=channel, timeline=[]
    )
    schedule = schedule_for(stage, method, 2, micro_batches=2 if method == "1f1b" else 1)
    for _ in range(mini_batch):
        schedule.on_mini_batch()
    worker.StageProcess._run(process, schedule.on_mini_batch(), lambda: done.append("side"))
    assert " ".join(done) == order


def test_an_inconsistent_schedule_stalls_with_a_named_error() -> None:
    """A stage whose schedule waits for a micro-batch no other stage will send leaves its
    action queued; the flush names the stage and the action instead of hanging."""
    model = mlp()
    x, y = batch()
    with pipeoptim.compile(
        model, sgd(model), 2, example_inputs=x, loss_fn=F.cross_entropy, method="gpipe",
        executor="local", profile_dir=None,
    ) as pipe:  # fmt: skip
        pipe._executor.schedules[1] = schedule_for(1, "gpipe", 2, micro_batches=2)
        pipe._executor.schedules[1].resume(5, 0)  # numbers its micro-batches from 10
        pipe.step(x, y)
        with pytest.raises(PipelineStalledError, match=r"pipeline stalled \(stage 0: B0, stage 1: F10\)"):
            pipe.flush()
        # the pipeline stopped there (raised once as it is, then named): close() flushes no more
        with pytest.raises(PipelineError, match=r"stopped at an earlier error \(PipelineStalledError"):
            pipe.step(x, y)
