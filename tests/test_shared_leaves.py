"""A module that runs whole (batch norm, an LSTM, attention) called at two places of a model:
its calls may lie in two stages, each holding a copy, unless it changes its buffers, which
keeps them in one (helper-116: every such model was refused, with a fix that named
leaf_modules the user had not given)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim


class Siamese(nn.Module):
    """One encoder applied to both inputs, far apart in the graph."""

    def __init__(self, encoder: str) -> None:
        super().__init__()
        self.kind = encoder
        if encoder == "lstm":
            self.enc: nn.Module = nn.LSTM(16, 16, batch_first=True)
        else:
            self.enc = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mid = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)])
        self.out = nn.Linear(32, 3)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)[0] if self.kind == "lstm" else self.enc(x, x, x, need_weights=False)[0]
        return h.mean(1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.mid(self.encode(a)), self.encode(b)], 1))


class NormedTwice(nn.Module):
    """One batch norm (running statistics) at both ends of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(16)
        self.mid = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6)])
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.mid(self.bn(x))))


def _plain(model: nn.Module, batches: list) -> tuple[list[float], dict]:
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(*x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def _pipelined(model: nn.Module, batches: list, executor: str, micro_batches: int) -> tuple:
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        2,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method="1f1b",
        micro_batches=micro_batches,
        executor=executor,
        profile_dir=None,
        timeout=60,
    ) as pipe:
        losses = [pipe.step(x, y).item() for x, y in batches]
        return losses, pipe.state_dict(), pipe.plan


def _same(got: tuple, expected: tuple) -> None:
    assert got[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
    assert got[1].keys() == expected[1].keys()
    for key, value in expected[1].items():
        torch.testing.assert_close(got[1][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["lstm", "attention"])
@pytest.mark.parametrize("executor", ["local", "processes"])
def test_a_siamese_encoder_in_two_stages_trains_as_the_model(encoder: str, executor: str) -> None:
    torch.manual_seed(0)
    model = Siamese(encoder)
    batches = [((torch.randn(8, 5, 16), torch.randn(8, 5, 16)), torch.randint(0, 3, (8,))) for _ in range(6)]
    got = _pipelined(model, batches, executor, micro_batches=4)
    held = {got[2].shared[node] == [0, 1] for node in got[2].shared}
    assert held == {True} and len(got[2].shared) >= 2  # the encoder's weights in both stages
    expected = _plain(model, [((x[0], x[1]), y) for x, y in batches])
    _same(got[:2], expected)


def test_a_batch_norm_called_twice_keeps_its_calls_in_one_stage() -> None:
    """Its running statistics are updated by both calls, in model order, as in the model."""
    torch.manual_seed(0)
    model = NormedTwice()
    batches = [((torch.randn(8, 16),), torch.randint(0, 3, (8,))) for _ in range(6)]
    got = _pipelined(model, batches, "local", micro_batches=1)
    plan = got[2]
    assert len({stage for node, stage in plan.stage_of.items() if node.startswith("bn")}) == 1
    assert plan.shared == {} and plan.num_stages == 2
    _same(got[:2], _plain(model, batches))
