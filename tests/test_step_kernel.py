"""The stages step with the kernel of the user's optimizer (fused, foreach or torch's default),
at every mini-batch, so the pipeline equals the user's plain training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.runtime.optim import apply_hyperparameters, hyperparameters, mirror
from tests.given_plans import plan_starting_at


def batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps, **kw: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, **kw),
        lambda ps, **kw: torch.optim.Adam(ps, lr=1e-2, **kw),
    ],
)
@pytest.mark.parametrize("fused", [None, True])
def test_stages_step_with_the_users_kernel(make, fused: bool | None) -> None:
    """GPipe (a flush every mini-batch) equals plain training with the same optimizer to 1e-6,
    and a step after several mini-batches runs torch's fused kernel once per stage exactly
    where the user asked for it (``fused=True``) and never otherwise: the stages once carried
    the user's ``fused=None`` in their groups while their defaults said ``fused=True``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    plain = copy.deepcopy(model)
    opt = make(plain.parameters(), fused=fused)
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    net = copy.deepcopy(model)
    # stage 1 from the second linear layer: both stages hold weights whatever the timings
    config = CostConfig(2, method="gpipe", micro_batches=1)
    plan = plan_starting_at(net, (batches()[0][0],), config, ["_2_weight"])
    with pipeoptim.compile(
        net, make(net.parameters(), fused=fused), 2, example_inputs=batches()[0][0],
        loss_fn=F.cross_entropy, method="gpipe", micro_batches=1, executor="local", plan=plan,
    ) as pipe:  # fmt: skip
        *first, last = batches()
        for x, y in first:
            pipe.step(x, y)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            pipe.step(*last)
        trained = pipe.state_dict()
        groups = [g for stage in pipe._executor.stages for g in stage.optimizer.param_groups]
    assert all(group["fused"] is fused for group in groups)
    kernel = f"aten::_fused_{type(opt).__name__.lower()}_"
    assert sum(e.count for e in prof.key_averages() if e.key == kernel) == (2 if fused else 0)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6)


def test_a_groups_own_step_choice_stands() -> None:
    """A user group that chose its step (here ``foreach=True``) keeps it in the stage, the
    other group keeps the user's default; a mini-batch's hyperparameters change neither."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    user = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters(), "foreach": True}], lr=0.1)
    names = [["a.weight", "a.bias"], ["b.weight", "b.bias"]]
    params = dict(zip(("a.weight", "a.bias", "b.weight", "b.bias"), [*a.parameters(), *b.parameters()]))
    stage, group_map = mirror(type(user), user.defaults, names, hyperparameters(user), params)
    choice = [(g["fused"], g["foreach"]) for g in stage.param_groups]
    assert group_map == [0, 1] and choice == [(None, None), (None, True)]
    apply_hyperparameters(stage, group_map, [h | {"lr": 0.5} for h in hyperparameters(user)])
    assert [(g["fused"], g["foreach"]) for g in stage.param_groups] == choice
    assert [g["lr"] for g in stage.param_groups] == [0.5, 0.5]
