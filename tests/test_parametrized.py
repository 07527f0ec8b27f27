"""A module with parametrized weights (torch.nn.utils.parametrize) runs whole, following
.train()/.eval(): traced through, spectral_norm's power iteration was fixed in training mode,
so predict() moved its vectors and differed from the model in eval mode (helper-116)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim


class Critic(nn.Module):
    def __init__(self, norm: str) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 32)
        if norm == "spectral":
            self.l2 = nn.utils.parametrizations.spectral_norm(nn.Linear(32, 32))
        else:
            self.l2 = nn.utils.parametrizations.weight_norm(nn.Linear(32, 32))
        self.l3 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


@pytest.mark.parametrize("norm, micro_batches", [("spectral", 1), ("weight", 2)])
def test_predict_between_steps_is_the_model_in_eval_mode(norm: str, micro_batches: int) -> None:
    """(spectral_norm's power iteration runs once per forward call: once per micro-batch, so
    its vectors follow the plain model's with one micro-batch only, as batch norm's statistics do.)"""
    torch.manual_seed(0)
    model = Critic(norm)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        2,
        example_inputs=x,
        loss_fn=F.cross_entropy,
        method="1f1b",
        micro_batches=micro_batches,
        executor="local",
        profile_dir=None,
    ) as pipe:
        for step in range(6):
            reference.train()
            opt.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            opt.step()
            loss = pipe.step(x, y)
            loss.item()
            if step % 2:
                reference.eval()
                with torch.no_grad():
                    expected = reference(x)
                torch.testing.assert_close(pipe.predict(x), expected, rtol=0, atol=1e-6)
        state = pipe.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)


def _compile(model: nn.Module, executor: str, method: str = "pipeoptim", plan=None) -> pipeoptim.Pipeline:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options = {"loss_fn": F.cross_entropy, "executor": executor, "profile_dir": None, "method": method}
    options["plan"] = plan
    return pipeoptim.compile(model, optimizer, 2, example_inputs=torch.randn(8, 16), **options)


@pytest.mark.parametrize("norm, method", [("spectral", "pipeoptim"), ("weight", "1f1b")])
def test_worker_processes_give_the_local_numbers(norm: str, method: str) -> None:
    """torch refuses to pickle a parametrized module, so the processes executor (the default)
    refused these models; the workers now get them rebuilt, spectral_norm's vectors included."""
    torch.manual_seed(0)
    model = Critic(norm)
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    runs, plan = {}, None
    for executor in ("local", "processes"):  # one plan: PipeOptim's numbers depend on the cut
        with _compile(copy.deepcopy(model), executor, method, plan) as pipe:
            plan = pipe.plan
            losses = [pipe.step(x, y) for _ in range(5)]
            runs[executor] = ([float(v) for v in losses], pipe.predict(x), pipe.state_dict())
    local, processes = runs["local"], runs["processes"]
    assert local[0] == processes[0]
    torch.testing.assert_close(processes[1], local[1], rtol=0, atol=0)
    assert processes[2].keys() == local[2].keys() == model.state_dict().keys()
    for name, value in local[2].items():
        torch.testing.assert_close(processes[2][name], value, rtol=0, atol=0)
    if norm == "spectral":  # the power iteration ran in the workers (its vector moved)
        start = model.l2.parametrizations.weight[0]._u
        assert not torch.equal(local[2]["l2.parametrizations.weight.0._u"], start)


def test_the_old_weight_norm_is_refused_with_its_replacement() -> None:
    """torch.nn.utils.weight_norm (hooks, not a parametrization) cannot be deep-copied; the
    refusal spoke of sparse tensors and open files only (helper-117)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.utils.weight_norm(nn.Linear(32, 5)))
    expected = r"nn.utils.parametrizations.weight_norm for the old nn.utils.weight_norm"
    with pytest.raises(ValueError, match=expected):
        _compile(model, "local")
