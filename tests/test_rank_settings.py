"""What torchrun ranks compare of their compile calls (pipeoptim.runtime.rank_settings); the
comparison itself runs under torchrun in test_torchrun.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeoptim.runtime.rank_settings import compile_settings


def _settings(
    model: nn.Module, opt: torch.optim.Optimizer, rows: int = 8, **options: object
) -> dict[str, str]:
    return compile_settings(
        model, opt, (torch.randn(rows, 4),), F.cross_entropy, {"method": "pipeoptim", **options}
    )


def _differing(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}


def test_settings_differ_exactly_where_the_calls_do() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    other_weights = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # rank 0's are broadcast
    base = _settings(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert (
        _differing(
            base, _settings(other_weights, torch.optim.SGD(other_weights.parameters(), lr=0.1, momentum=0.9))
        )
        == set()
    )
    assert _differing(base, _settings(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9))) == {
        "lr of param group 0"
    }
    wider = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 3))
    assert _differing(base, _settings(wider, torch.optim.SGD(wider.parameters(), lr=0.1, momentum=0.9))) == {
        "model"
    }
    assert _differing(
        base, _settings(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rows=4)
    ) == {"example inputs"}
    stepped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    stepped.step()
    assert _differing(base, _settings(model, stepped)) == {"optimizer state"}
    adam = _settings(model, torch.optim.Adam(model.parameters(), lr=0.1))
    assert {"optimizer", "momentum of param group 0", "betas of param group 0"} <= _differing(base, adam)
    assert _differing(
        base, _settings(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), micro_batches=2)
    ) == {"micro_batches"}
    assert base["model"] == "Sequential: 4 parameter tensors, 67 values (shapes " + base["model"][-9:]
