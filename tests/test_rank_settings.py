"""What torchrun ranks compare of their compile calls (pipeoptim.runtime.rank_settings); the
comparison itself runs under torchrun in test_torchrun.py."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeoptim.runtime.rank_settings import compile_settings


def _settings(
    model: nn.Module, opt: torch.optim.Optimizer, rows: int = 8, **options: object
) -> dict[str, str]:
    arguments = {"model": model, "optimizer": opt, "gpus": 2, "example_inputs": torch.randn(rows, 4)}
    arguments |= {"loss_fn": F.cross_entropy, "method": "pipeoptim", "profile_dir": "profiles", **options}
    return compile_settings(arguments)


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
    assert base["model"].splitlines()[-1] == "4 parameter tensors, 67 values (shapes " + base["model"][-9:]
    assert list(base)[:3] == ["model", "optimizer", "param groups"]  # the class before its hyperparameters


def test_settings_hold_what_shapes_do_not_show() -> None:
    """helper-102: BatchNorm's momentum, Dropout's p, another activation and a loss function's
    options trained silently mixed; options only rank 0's planning reads (profile_dir,
    bandwidth, ...) and plain values forward never reads may differ (those it reads are in
    the traced graph, compared after tracing)."""
    torch.manual_seed(0)

    def net(p: float = 0.1, momentum: float = 0.1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=momentum), act(), nn.Dropout(p), nn.Linear(8, 3)
        )

    def settings(model: nn.Module, **options: object) -> dict[str, str]:
        return _settings(model, torch.optim.SGD(model.parameters(), lr=0.1), **options)

    base = settings(net())
    for other in (net(p=0.5), net(momentum=0.5), net(act=nn.Tanh)):
        assert _differing(base, settings(other)) == {"model"}
    ranked = net()
    ranked[2].rank = 3  # type: ignore[assignment]  # a plain value forward never reads may differ
    assert _differing(base, settings(ranked)) == set()
    smoothed = functools.partial(F.cross_entropy, label_smoothing=0.3)
    assert _differing(base, settings(net(), loss_fn=smoothed)) == {"loss_fn"}
    assert _differing(
        settings(net(), loss_fn=nn.CrossEntropyLoss()),
        settings(net(), loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1)),
    ) == {"loss_fn"}
    assert (
        _differing(base, settings(net(), profile_dir=None, bandwidth="1GB/s", timeout=5, solver="highs"))
        == set()
    )
