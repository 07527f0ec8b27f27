"""What torchrun ranks compare of their compile calls (pipeoptim.runtime.rank_settings); the
comparison itself runs under torchrun in test_torchrun.py."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeoptim.runtime.rank_settings import compile_settings, digest


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


def test_a_plan_is_compared_by_its_contents_and_a_function_by_its_name(tmp_path, monkeypatch) -> None:
    """helper-103: a plan file at another path (relative, absolute) or the Plan object itself
    was refused, another file behind the same path accepted (it trained without a ReLU); a
    loss_reduction function was compared by its address."""
    import pipeoptim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    plans = []
    for gpus in (2, 3):
        with pipeoptim.compile(
            model, opt, gpus, example_inputs=x, loss_fn=F.cross_entropy, executor="local", profile_dir=None
        ) as pipe:
            plans.append(pipe.plan)
    plans[0].save(tmp_path / "plan.json")
    plans[1].save(tmp_path / "other.json")
    monkeypatch.chdir(tmp_path)
    same = [_settings(model, opt, plan=p) for p in ("plan.json", tmp_path / "plan.json", plans[0])]
    assert same[0]["plan"].startswith("a plan ") and same[0] == same[1] == same[2]
    assert _differing(same[0], _settings(model, opt, plan="other.json")) == {"plan"}
    assert _settings(model, opt, plan="missing.json")["plan"] == "an unreadable plan file (PlanError)"
    one, two = (_settings(model, opt, loss_reduction=lambda n, rows: rows / n) for _ in range(2))
    assert _differing(one, two) == set() and "<lambda>" in one["loss_reduction"]


def test_the_digest_of_plain_values_tells_apart_what_their_values_and_types_do() -> None:
    """Hyperparameters are hashed at every step under torchrun by their repr (fast path);
    tensors still by their bytes."""
    hyper = [{"lr": 0.1, "betas": (0.9, 0.999), "foreach": None, "maximize": False}]
    assert digest(hyper) == digest([dict(hyper[0])])
    for other in (
        [{**hyper[0], "lr": 0.1 + 1e-17 + 1e-16}],  # the next float
        [{**hyper[0], "maximize": 0}],
        [{**hyper[0], "betas": [0.9, 0.999]}],
        [hyper[0], hyper[0]],
    ):
        assert digest(other) != digest(hyper)
    assert digest(1) != digest(1.0) != digest(True)
    assert digest([{"lr": torch.tensor([0.1, 0.2])}]) != digest([{"lr": torch.tensor([0.1, 0.3])}])
    assert digest({"w": torch.ones(2)}) == digest({"w": torch.ones(2)})
