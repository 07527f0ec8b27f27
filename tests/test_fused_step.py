"""The stages' optimizer step runs fused where the user left torch's choice open."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.runtime.optim import stage_keywords


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
    "make, exact",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2), True),
        (lambda ps: torch.optim.Adam(ps, lr=1e-2), False),
    ],
)
def test_fused_stages_train_as_the_users_optimizer(make, exact: bool) -> None:
    """GPipe (a flush every mini-batch) with the stages' fused step equals plain training with
    the user's unfused optimizer: SGD to the bit, Adam to 1e-6 (its fused kernel may round the
    last bit otherwise)."""
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
        for x, y in batches():
            pipe.step(x, y)
        trained = pipe.state_dict()
    for name, value in plain.state_dict().items():
        if exact:
            assert torch.equal(trained[name], value), name
        else:
            torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6)
