"""A pipeline takes over the optimizer state it is given, and loading state into a pipeline
that has trained equals loading it into a fresh one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim

ADAM = (torch.optim.Adam, {"lr": 1e-2})
SGD_MOMENTUM = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("optimizer", [ADAM, SGD_MOMENTUM], ids=["adam", "sgd-momentum"])
@pytest.mark.parametrize("method, executor", [("gpipe", "local"), ("1f1b", "processes")])
def test_a_model_trained_before_compile_continues_with_its_optimizers_state(
    optimizer, method: str, executor: str, tmp_path
) -> None:
    """Three plain steps, then compile: the stages' optimizers started empty, so Adam's
    moments, its step count and SGD's momentum restarted (weights 6e-2 and 1.2e-1 off plain
    training after five more steps). They now continue from the optimizer's state."""
    cls, kwargs = optimizer
    data = batches(8)
    reference = mlp()
    ref_opt = cls(reference.parameters(), **kwargs)
    for x, y in data[:3]:
        plain_step(reference, ref_opt, x, y)
    model = copy.deepcopy(reference)
    opt = cls(model.parameters(), **kwargs)
    opt.load_state_dict(ref_opt.state_dict())  # as a user resuming plain training would
    for p, q in zip(reference.parameters(), model.parameters()):
        q.grad = p.grad.clone()
    with pipeoptim.compile(
        model,
        opt,
        gpus=2,
        method=method,
        micro_batches=1,
        executor=executor,
        example_inputs=data[0][0],
        loss_fn=F.cross_entropy,
        profile_dir=tmp_path,
    ) as pipe:
        for x, y in data[3:]:
            plain_step(reference, ref_opt, x, y)
            pipe.step(x, y)
        state = pipe.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_2bw_loaded_into_a_trained_pipeline_equals_loaded_into_a_fresh_one(tmp_path) -> None:
    """The first mini-batch after a load used the shadow weights (W(t-1)) left from training
    before it: neither the loaded weights nor those the documented resume uses."""
    data = batches(9)

    def compiled() -> pipeoptim.Pipeline:
        model = mlp()
        return pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            gpus=2,
            method="2bw",
            executor="local",
            example_inputs=data[0][0],
            loss_fn=F.cross_entropy,
            profile_dir=tmp_path,
        )

    with compiled() as source:
        for x, y in data[:3]:
            source.step(x, y)
        source.save_checkpoint(tmp_path / "ck.pt")
    losses = []
    for trained_first in (False, True):
        with compiled() as pipe:
            if trained_first:
                for x, y in data[3:6]:
                    pipe.step(x, y)
            pipe.load_checkpoint(tmp_path / "ck.pt")
            losses.append([float(pipe.step(x, y)) for x, y in data[6:]])
    assert losses[0] == losses[1]


def _pipeline(model: nn.Module, opt: torch.optim.Optimizer, method: str = "1f1b") -> pipeoptim.Pipeline:
    x = batches(1)[0][0]
    options = {"loss_fn": F.cross_entropy, "method": method, "executor": "local", "profile_dir": None}
    return pipeoptim.compile(model, opt, 2, example_inputs=x, **options)


@pytest.mark.parametrize("change", ["add_param_group", "group params", "step hook"])
def test_an_optimizer_changed_after_compile_is_refused(change: str) -> None:
    """The stages build their optimizers at compile: a group added later never trained, a step
    hook never ran (weights 0.21 and 0.38 off plain training, silently; helper-128)."""
    model = mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD(weights, lr=0.1)
    with _pipeline(model, opt) as pipe:
        x, y = batches(1)[0]
        pipe.step(x, y).item()
        if change == "add_param_group":
            opt.add_param_group({"params": biases, "lr": 0.5})
            expected = "2 groups at compile, 1 now|1 groups at compile, 2 now"
        elif change == "group params":
            opt.param_groups[0]["params"] = weights[:2]
            expected = "the parameters of group 0 changed"
        else:
            opt.register_step_post_hook(lambda *_: None)
            expected = "step hooks"
        with pytest.raises(pipeoptim.PipelineError, match=expected):
            pipe.step(x, y)


def test_step_hooks_are_refused_at_compile() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.register_step_pre_hook(lambda *_: None)
    with pytest.raises(pipeoptim.PipelineError, match=r"Adam has step hooks .* subclass's step\(\)"):
        _pipeline(model, opt)


class SignSGD(torch.optim.SGD):
    """A subclass with its own update rule, ``W ← W − lr · sign(g)``."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad.sign(), alpha=-group["lr"])


def test_compile_warns_where_a_subclass_step_is_predicted_with_its_bases_rule() -> None:
    model = mlp()
    opt = SignSGD(model.parameters(), lr=0.1)
    expected = r"SignSGD writes its own step\(\), but pipeoptim predicts .* SGD's"
    with pytest.warns(UserWarning, match=expected), _pipeline(model, opt, "pipeoptim"):
        pass
