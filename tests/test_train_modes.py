"""The user's train/eval modes: a module the user put in eval mode before compile (a frozen
BatchNorm when fine-tuning, a Dropout turned off) trains in eval mode, as in plain PyTorch,
and ``predict()`` gives every module back its own mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim


class FrozenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.drop, self.c = (
            nn.Linear(8, 16),
            nn.BatchNorm1d(16),
            nn.Dropout(0.5),
            nn.Linear(16, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.drop(F.relu(self.bn(self.a(x)))))


def frozen() -> FrozenNorm:
    torch.manual_seed(0)
    model = FrozenNorm()
    model.bn.eval()  # fine-tuning: running statistics kept, not updated
    model.drop.eval()  # dropout off
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize(
    ("method", "executor"), [("gpipe", "local"), ("pipeoptim", "local"), ("1f1b", "processes")]
)
def test_modules_in_eval_mode_train_in_eval_mode(method: str, executor: str) -> None:
    """Equal to plain training of the same model (the statistics untouched, no dropout); before,
    compile put every module in training mode: BatchNorm normalised with batch statistics and
    counted batches, Dropout dropped (losses 0.06-0.22 apart)."""
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    reference = frozen()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    expected = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        opt.step()
        expected.append(loss.item())
    model = frozen()
    with pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        gpus=2 if method != "pipeoptim" else 1,
        method=method,
        micro_batches=1 if method != "pipeoptim" else None,
        example_inputs=x,
        loss_fn=F.cross_entropy,
        executor=executor,
        profile_dir=None,
    ) as pipe:
        got = [float(pipe.step(x, y)) for _ in range(3)]
        predicted = pipe.predict(x)
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(predicted, reference.eval()(x), rtol=1e-5, atol=1e-6)
    assert int(state["bn.num_batches_tracked"]) == 0
    torch.testing.assert_close(state["bn.running_mean"], reference.bn.running_mean)


def test_predict_gives_each_module_its_own_mode_back() -> None:
    """After predict() the BatchNorm the user froze is still in eval mode and the rest trains."""
    x = torch.randn(8, 8)
    model = frozen()
    model.drop.train()
    with pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        gpus=1,
        example_inputs=x,
        loss_fn=F.cross_entropy,
        executor="local",
        profile_dir=None,
    ) as pipe:
        pipe.predict(x)
        modes = {
            name: m.training
            for stage in pipe._executor.stages
            for name, m in stage.module.named_modules()
            if name in ("bn", "drop")
        }
    assert modes == {"bn": False, "drop": True}
    torch.testing.assert_close(copy.deepcopy(model).bn.running_mean, frozen().bn.running_mean)
