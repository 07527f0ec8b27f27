"""Run as a script (its classes live in ``__main__``): a dataclass output and an optimizer
whose weight predictor is registered here must reach the stage worker processes and come back
as this script's own classes (tests/test_user_models.py runs it)."""

import dataclasses
import sys

import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    aux: torch.Tensor


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> Out:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return Out(self.c(h), h.pow(2).mean(1))


def loss_fn(out: Out, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, y) + out.aux.mean()


class SignSGD(torch.optim.Optimizer):
    """W <- W - lr * sign(m), m the momentum of the gradients."""

    def __init__(self, params, lr: float = 0.01, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    m = self.state[p].setdefault("m", torch.zeros_like(p))
                    m.mul_(group["beta"]).add_(p.grad)
                    p.add_(m.sign(), alpha=-group["lr"])


def sign_predictor(p, state, group):
    return None if "m" not in state else group["lr"] * state["m"].sign()


pipeoptim.register_predictor(SignSGD, sign_predictor)

if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    losses, plan = {}, None
    for executor in ("local", "processes"):
        torch.manual_seed(0)
        model = Net()
        with pipeoptim.compile(
            model,
            SignSGD(model.parameters()),
            gpus=2,
            method="pipeoptim",
            example_inputs=x,
            loss_fn=loss_fn,
            executor=executor,
            profile_dir=None,
            plan=plan,
        ) as pipe:
            plan = pipe.plan
            losses[executor] = [float(pipe.step(x, y)) for _ in range(4)]
            out = pipe.predict(x)
            assert type(out) is Out, type(out)
    assert losses["local"] == losses["processes"], losses
    print("ok", losses["local"], file=sys.stderr)
