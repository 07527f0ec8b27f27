"""Tied weights: a weight two stages use is held by both (a copy each, gradients summed), so
the worker processes compute exactly what the local executor does, run after run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.methods import METHODS


class TiedEmbedding(nn.Module):
    """Input embedding and output projection share one ``[10, 8]`` weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def tied_setup(
    n: int,
) -> tuple[TiedEmbedding, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A seeded :class:`TiedEmbedding`, SGD with momentum over it, and ``n`` mini-batches of 8 ids."""
    torch.manual_seed(0)
    model = TiedEmbedding()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    return (
        model,
        opt,
        [
            (torch.randint(0, 10, (8,), generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)
        ],
    )


def train(method: str, executor: str, profiles: Path) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    model, opt, batches = tied_setup(10)
    with pipeoptim.compile(
        model,
        opt,
        2,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        executor=executor,
        profile_dir=profiles,
        timeout=120,
    ) as pipe:
        return list(pipe.train(batches)), pipe.state_dict(), (pipe.plan, pipe.stage_state_dicts())


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_tied_weights_processes_equal_local_to_the_bit(method: str, tmp_path: Path) -> None:
    local = train(method, "local", tmp_path)
    plan, stages = local[2]
    assert plan.shared == {"emb_weight": [0, 1]}  # each stage holds a copy: nothing is sent
    assert all("emb_weight" not in io.outputs for io in plan.io)
    assert torch.equal(stages[0]["emb.weight"], stages[1]["emb.weight"])  # the copies agree
    procs = train(method, "processes", tmp_path)
    assert procs[0] == local[0]
    for key, value in local[1].items():
        assert torch.equal(procs[1][key], value), key
    for own, theirs in zip(stages, procs[2][1]):
        assert all(torch.equal(own[k], theirs[k]) for k in own)
    assert torch.equal(local[1]["emb.weight"], local[1]["head.weight"])


@pytest.mark.slow
def test_tied_weights_repeated_runs_are_identical(tmp_path: Path) -> None:
    first, second = train("none", "processes", tmp_path), train("none", "processes", tmp_path)
    assert first[0] == second[0]
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_tied_names_load_and_save_as_torch_does(tmp_path: Path) -> None:
    """helper-123: a state whose tied names held different values loaded the first name's into
    every stage's copy, where torch's load_state_dict keeps the last one copied in (predict then
    differed from the plain model by 2.4), and state_dict() gave the names two tensors (the
    file held the weight twice)."""
    model, opt, batches = tied_setup(1)
    reference = TiedEmbedding()
    state = {**reference.state_dict(), "emb.weight": torch.randn(10, 8), "head.weight": torch.randn(10, 8)}
    reference.load_state_dict(state)
    assert torch.equal(reference.emb.weight, state["head.weight"])  # the last name wins
    x = batches[0][0]
    with pipeoptim.compile(
        model, opt, 2, example_inputs=x, loss_fn=F.cross_entropy, executor="local", profile_dir=tmp_path
    ) as pipe:
        holders = [d for d in pipe.stage_state_dicts() if {"emb.weight", "head.weight"} & set(d)]
        assert len(holders) == 2  # a copy in each stage
        pipe.load_state_dict(state)
        torch.testing.assert_close(pipe.predict(x), reference.eval()(x), rtol=0, atol=0)
        saved = pipe.state_dict()
        assert saved["emb.weight"] is saved["head.weight"]
        assert torch.equal(saved["emb.weight"], state["head.weight"])


class SharedBatchNorm(nn.Module):
    """One BatchNorm registered twice (``bn`` and ``bn2``): its buffers have two names."""

    def __init__(self) -> None:
        super().__init__()
        self.l, self.bn, self.l2 = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)
        self.bn2 = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.bn2(torch.tanh(self.bn(self.l(x)))))


def test_a_module_registered_twice_keeps_its_buffers_under_both_names(tmp_path: Path) -> None:
    """helper-125: only parameters were followed under their other names: state_dict() gave
    bn2's running statistics from the untrained template, so to_module() (torch's last name
    wins) threw the trained ones away (0.075 off the plain model)."""
    torch.manual_seed(0)
    model, x, y = SharedBatchNorm(), torch.randn(8, 8), torch.randn(8, 8)
    reference = SharedBatchNorm()
    reference.load_state_dict(model.state_dict())
    with pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),  # only the running statistics move
        2,
        example_inputs=x,
        loss_fn=F.mse_loss,
        executor="local",
        profile_dir=tmp_path,
    ) as pipe:
        pipe.step(x, y).wait()
        reference(x)
        saved = pipe.state_dict()
        assert saved["bn.running_mean"] is saved["bn2.running_mean"]
        torch.testing.assert_close(saved["bn2.running_mean"], reference.bn.running_mean, rtol=0, atol=0)
        module = pipe.to_module().eval()
        torch.testing.assert_close(module(x), reference.eval()(x), rtol=0, atol=0)
        other = {**saved, "bn2.running_mean": torch.full((8,), 5.0)}  # torch keeps the last name's
        reference.load_state_dict(other)
        pipe.load_state_dict(other)
        torch.testing.assert_close(pipe.predict(x), reference(x), rtol=0, atol=0)
