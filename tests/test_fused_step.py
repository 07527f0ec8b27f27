"""The stages' optimizer step runs fused where the user left torch's choice open."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.runtime.optim import apply_hyperparameters, hyperparameters, mirror, stage_keywords


class ClippedSGD(torch.optim.SGD):
    """A subclass: its step() may do more than SGD's, so it is built as the user wrote it."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.clamp_(-1.0, 1.0)
        return super().step(closure)


def defaults(cls: type, **options) -> dict:
    return cls([nn.Parameter(torch.zeros(2))], lr=0.1, **options).defaults


@pytest.mark.parametrize(
    "cls, options, fused",
    [
        (torch.optim.SGD, {"momentum": 0.9}, True),
        (torch.optim.Adam, {}, True),
        (torch.optim.AdamW, {"weight_decay": 0.1}, True),
        (torch.optim.Adagrad, {}, True),
        (torch.optim.SGD, {"fused": False}, False),  # the user's choice stands
        (torch.optim.SGD, {"foreach": True}, None),
        (torch.optim.SGD, {"foreach": False}, None),
        (torch.optim.SGD, {"differentiable": True}, None),  # no fused kernel differentiates
        (torch.optim.RMSprop, {}, None),  # no fused kernel
        (ClippedSGD, {}, None),
    ],
)
def test_fused_only_where_the_user_left_the_choice_open(cls: type, options: dict, fused: bool | None) -> None:
    keywords = stage_keywords(cls, defaults(cls, **options), "cpu")
    assert keywords.get("fused") is fused
    given = defaults(cls, **options)  # the rest as the user gave it (what __init__ accepts)
    assert keywords["lr"] == 0.1 and all(given[k] == v for k, v in keywords.items() if k != "fused")


def batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
    ],
)
def test_fused_stages_train_as_the_users_optimizer(make) -> None:
    """GPipe (a flush every mini-batch) with the stages' fused step equals plain training with
    the user's unfused optimizer to 1e-6 (the fused kernels may round the last bit otherwise:
    SGD in a tensor's elements past its last full vector, here the 5 biases), and every stage
    steps with the fused kernel at every mini-batch, not only the first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    plain = copy.deepcopy(model)
    opt = make(plain.parameters())
    assert opt.defaults["fused"] is None
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net, make(net.parameters()), 2, example_inputs=batches()[0][0], loss_fn=F.cross_entropy,
        method="gpipe", micro_batches=1, executor="local", profile_dir=None,
    ) as pipe:  # fmt: skip
        assert all(stage.optimizer.defaults["fused"] is True for stage in pipe._executor.stages)
        *first, last = batches()
        for x, y in first:
            pipe.step(x, y)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            pipe.step(*last)
        trained = pipe.state_dict()
        groups = [g for stage in pipe._executor.stages for g in stage.optimizer.param_groups]
    # still fused after steps that set the user's hyperparameters (whose fused is None)
    assert all(group["fused"] is True for group in groups)
    kernel = f"aten::_fused_{type(opt).__name__.lower()}_"
    assert sum(e.count for e in prof.key_averages() if e.key == kernel) == 2  # one per stage
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6)


def test_a_groups_own_step_choice_stands() -> None:
    """A user group that chose its step (here ``foreach=True``) keeps it in the stage; the
    others take the stage's fused step; a mini-batch's hyperparameters change neither."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    user = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters(), "foreach": True}], lr=0.1)
    names = [["a.weight", "a.bias"], ["b.weight", "b.bias"]]
    params = dict(zip(("a.weight", "a.bias", "b.weight", "b.bias"), [*a.parameters(), *b.parameters()]))
    stage, group_map = mirror(type(user), user.defaults, names, hyperparameters(user), params)
    choice = [(g["fused"], g["foreach"]) for g in stage.param_groups]
    assert group_map == [0, 1] and choice == [(True, None), (None, True)]
    apply_hyperparameters(stage, group_map, [h | {"lr": 0.5} for h in hyperparameters(user)])
    assert [(g["fused"], g["foreach"]) for g in stage.param_groups] == choice
    assert [g["lr"] for g in stage.param_groups] == [0.5, 0.5]
