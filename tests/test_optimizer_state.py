"""The optimizer-state bytes the plan counts per parameter byte (compiler/optimizer_state.py)
against what torch.optim holds after a step (helper-115: only the first param group was read,
so SGD with momentum in its second group counted no state, and a subclass of SGD counted 2)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from pipeoptim.compiler.optimizer_state import optimizer_state_factor


class Clipped(torch.optim.SGD):
    """A user's optimizer derived from SGD."""


def _held(optimizer: torch.optim.Optimizer, model: nn.Module) -> float:
    """State bytes per parameter byte torch holds after one step (the scalar step counts left out)."""
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return state / params


def _two_groups(make: Callable[..., torch.optim.Optimizer], first: dict, second: dict) -> Callable:
    return lambda m: make(
        [{"params": m[0].parameters(), **first}, {"params": m[1].parameters(), **second}], lr=0.1
    )


CASES = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "sgd momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "a subclass of sgd": lambda m: Clipped(m.parameters(), lr=0.1),
    "adam amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=0.1, amsgrad=True),
    "rmsprop centered momentum": lambda m: torch.optim.RMSprop(
        m.parameters(), lr=0.1, momentum=0.9, centered=True
    ),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1),
}
GROUPS = {
    "momentum in the second group": _two_groups(torch.optim.SGD, {}, {"momentum": 0.9}),
    "amsgrad in the second group": _two_groups(torch.optim.Adam, {}, {"amsgrad": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_factor_is_what_torch_holds(case: str) -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    optimizer = CASES[case](model)
    assert optimizer_state_factor(optimizer) == pytest.approx(_held(optimizer, model))


@pytest.mark.parametrize("case", list(GROUPS))
def test_groups_that_differ_count_the_largest(case: str) -> None:
    """An upper bound: each stage holds at most that much (its parameters may all be in the
    group with the most state)."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    optimizer = GROUPS[case](model)
    second = model[1]
    second_bytes = sum(p.numel() * p.element_size() for p in second.parameters())
    held = _held(optimizer, model) * sum(p.numel() * p.element_size() for p in model.parameters())
    in_second = sum(
        t.numel() * t.element_size()
        for p in second.parameters()
        for t in optimizer.state[p].values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    assert optimizer_state_factor(optimizer) == pytest.approx(in_second / second_bytes)
    assert optimizer_state_factor(optimizer) * sum(p.numel() * 4 for p in model.parameters()) > held
