"""Which stages draw random numbers (:mod:`pipeoptim.runtime.randomness`): those are seeded
before each forward, the others run without the seeding and the generator's fork."""

from __future__ import annotations

import random
from random import uniform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from pipeoptim.runtime.randomness import Draws, draws_random_numbers, seeded
from pipeoptim.runtime.stage import StageRuntime


class FunctionalDropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(F.relu(x), 0.1, self.training)


class Noise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.01 * torch.randn_like(x)


class InPlaceMask(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.empty_like(x).bernoulli_(0.9)


class Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x, dropout_p=0.1)


class UsersLayer(nn.Module):  # opaque to the check: a leaf module of the user's
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.rand(()) > 0.5)


class WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.mine = nn.Linear(8, 8), UsersLayer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mine(self.linear(x))


class Leaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, (UsersLayer, _Quiet)) or super().is_leaf_module(m, name)


def _traced(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, Leaves().trace(model))


def _plain() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.LayerNorm(8), nn.Flatten(), nn.Softmax(-1))


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)),
        nn.Sequential(nn.Linear(8, 8), nn.RReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), nn.AlphaDropout(0.1))),
        FunctionalDropout(),
        Noise(),
        InPlaceMask(),
        Attention(),
        WithLeaf(),
    ],
    ids=[
        "Dropout",
        "RReLU",
        "nested AlphaDropout",
        "F.dropout",
        "randn_like",
        "bernoulli_",
        "sdpa",
        "user leaf",
    ],
)
def test_stages_that_may_draw_are_found(model: nn.Module) -> None:
    assert draws_random_numbers(_traced(model))


def test_a_stage_of_plain_layers_draws_nothing() -> None:
    assert not draws_random_numbers(_traced(_plain()))
    assert draws_random_numbers(_plain())  # not a graph: unseen, so counted as drawing


def test_nested_graph_modules_are_looked_into() -> None:
    outer = nn.Module()
    outer.inner = _traced(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)))
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("inner", (x,)))
    assert draws_random_numbers(fx.GraphModule(outer, graph))
    outer.inner = _traced(_plain())
    assert not draws_random_numbers(fx.GraphModule(outer, graph))


def test_an_exported_dropout_is_found() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)).train()
    exported = torch.export.export(model, (torch.randn(2, 8),)).module()
    assert draws_random_numbers(exported)


def _stage(model: nn.Module) -> StageRuntime:
    module = _traced(model)
    return StageRuntime(0, 2, module, torch.optim.SGD(module.parameters(), lr=0.1), [0], None, [False])


def test_a_stage_that_draws_nothing_leaves_the_generator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _stage(_plain())

    def no_fork(*args: object, **kwargs: object) -> None:
        raise AssertionError("forked the generator")

    monkeypatch.setattr(torch.random, "fork_rng", no_fork)
    x = torch.randn(4, 8)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    out = stage.forward(0, (x,))
    assert torch.equal(torch.get_rng_state(), state)  # neither seeded nor drawn from
    assert torch.equal(out, _plain_output(stage, x))


def _plain_output(stage: StageRuntime, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return stage.module(x)


def test_a_stage_that_draws_draws_the_micro_batchs_masks_and_restores_the_generator() -> None:
    stage = _stage(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)))
    x = torch.randn(16, 8)
    torch.manual_seed(1)
    first = stage.forward(5, (x,))
    before = torch.get_rng_state()
    torch.manual_seed(2)  # another caller state: the same masks
    again = stage.forward(5, (x,))
    assert torch.equal(first, again)
    assert not torch.equal(first, stage.forward(6, (x,)))  # another micro-batch, other masks
    torch.manual_seed(1)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator moved on as before
    with seeded(None, []):
        assert torch.equal(torch.get_rng_state(), before)


def _noisy(x: torch.Tensor) -> torch.Tensor:
    return x * random.random()


class _Quiet(nn.Module):
    """A user's leaf drawing nothing (made a leaf for a data-dependent branch, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.scale(x))


class _Random(_Quiet):
    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x * random.random()


class _Imported(_Quiet):
    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x * uniform(0.5, 1.5)


class _NumPy(_Quiet):
    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(np.random.rand())


class _Helper(_Quiet):
    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return _noisy(x)


DRAWN_BY = {
    _Quiet: Draws.TORCH,
    _Random: Draws.ANY,
    _Imported: Draws.ANY,
    _NumPy: Draws.ANY,
    _Helper: Draws.ANY,
}


@pytest.mark.parametrize("leaf", list(DRAWN_BY), ids=lambda c: c.__name__)
def test_a_users_leaf_seeds_pythons_generators_only_where_its_code_names_them(leaf: type) -> None:
    """Every user's leaf was seeded with Python's and NumPy's generators, 160 us per forward
    (a leaf made for a data-dependent branch, drawing nothing: 4.4 ms per step against 2.5;
    helper-131)."""
    model = nn.Sequential(nn.Linear(8, 8), leaf())
    assert draws_random_numbers(_traced(model)) == DRAWN_BY[leaf]
