"""In-place changes in a model's forward (``h.mul_(0.5)``, ``self.ema.mul_(0.9).add_(...)``,
``x[:, 0] = 0``, ``inplace=True``): whatever the stage count, a change happens in the stage of
the tensor it changes, so the pipeline computes what the model does (compiler/grouping.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.compiler.grouping import fine_units
from pipeoptim.compiler.profile import profile_model
from pipeoptim.compiler.trace import trace


class ScaledAfterCut(nn.Module):
    """In-place changes whose result no node reads: ``mul_`` and ``clamp_`` change ``h``,
    which the next layer reads through the node that produced it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (
            nn.Linear(8, 64),
            nn.Linear(64, 64),
            nn.Linear(64, 64),
            nn.Linear(64, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.tanh(self.a(x)))
        h.mul_(0.5)
        h = self.c(h)
        h.clamp_(min=-0.2)
        h[:, 0] = 0.0
        return self.d(h)


class RunningStats(nn.Module):
    """Buffers changed in place: a counter and an exponential average by a chained change."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.count.add_(1)
        self.ema.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        h = self.b(torch.relu(h))
        return self.c(torch.relu(h))


class ReadAgainLater(nn.Module):
    """A buffer changed first and read again at the end: the second read is a get_attr node of
    its own, which read a stale copy in a later stage (helper-83)."""

    def __init__(self) -> None:
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.d = nn.Linear(8, 4)
        self.register_buffer("cnt", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.cnt.add_(x.detach().mean(0))
        for layer in self.ls:
            h = torch.tanh(layer(h))
        return self.d(h + self.cnt)


class ClampedWeight(nn.Module):
    """A parameter changed in place in forward (a weight constraint): one get_attr node feeds
    both the change and the layer, which a plan put in another stage, on a copy of the weight
    that was never clamped (helper-85: loss off by 1e-3, the weight by 0.04, no error)."""

    def __init__(self) -> None:
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.o = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ls[2].weight.data.clamp_(-0.3, 0.3)
        h = x
        for layer in self.ls:
            h = torch.tanh(layer(h))
        return self.o(h)


def plain_training(model: nn.Module, batches, micro: int, lr: float = 0.1) -> list[float]:
    """Gradient accumulation over ``micro`` equal micro-batches, SGD with momentum: the
    reference of the synchronous methods."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(x.tensor_split(micro), y.tensor_split(micro)):
            loss = F.cross_entropy(model(xs), ys) / micro
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses


def batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 8, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("model_class", [ScaledAfterCut, RunningStats, ReadAgainLater, ClampedWeight])
@pytest.mark.parametrize("gpus", [2, 3, 4])
def test_in_place_changes_train_as_the_model(model_class, gpus: int) -> None:
    """gpipe at every stage count equals plain training, buffers included; before, a plan cut
    right before ``clamp_`` failed ('a leaf Variable that requires grad is being used in an
    in-place operation'), put ``mul_`` after the layer reading its tensor (another loss), or
    changed a received copy of ``ema`` (its updates lost)."""
    torch.manual_seed(0)
    base = model_class()
    reference = copy.deepcopy(base)
    expected = plain_training(reference, batches(), micro=gpus)
    model = copy.deepcopy(base)
    with pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        gpus=gpus,
        method="gpipe",
        example_inputs=batches()[0][0],
        loss_fn=F.cross_entropy,
        executor="local",
        profile_dir=None,
    ) as pipe:
        got = [float(pipe.step(x, y)) for x, y in batches()]
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_the_profile_names_what_each_node_changes_and_the_plan_keeps_them_together() -> None:
    """Every in-place change is recorded with the first node of the storage it changes (a
    buffer's get_attr, a chained change's first tensor); its unit holds that node."""
    model = RunningStats()
    traced = trace(model, torch.randn(4, 8))
    graph = profile_model(traced, (torch.randn(4, 8),), repeats=1, warmup=0)
    changes = sorted((n.target, n.mutates) for n in graph.nodes if n.mutates)
    assert changes == [("add_", ["count"]), ("add_", ["ema"]), ("mul_", ["ema"])]
    units = fine_units(graph)
    for node in graph.nodes:
        for root in node.mutates:
            assert units.unit_of[graph.index(root)] == units.unit_of[graph.index(node.name)]
    setitem = profile_model(
        trace(ScaledAfterCut(), torch.randn(4, 8)), (torch.randn(4, 8),), repeats=1, warmup=0
    )
    changed = {n.name: n.mutates for n in setitem.nodes if n.mutates}
    assert len(changed) == 3 and all(len(roots) == 1 for roots in changed.values())


class ChangedAtTheEnd(nn.Module):
    """A buffer read by the first layer and changed after the last one: the whole model is one
    unit a boundary may not cut."""

    def __init__(self) -> None:
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.register_buffer("seen", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.seen
        for layer in self.ls:
            out = torch.tanh(layer(out))
        self.seen.add_(1)
        return out


def test_a_change_that_holds_the_model_together_says_so() -> None:
    """The stage-count error named 'nodes that do work' (5 Linear layers, 'only 2'), not the
    in-place change that holds them in one stage."""
    from pipeoptim.errors import PlanError

    model = ChangedAtTheEnd()
    with pytest.raises(PlanError, match=r"hold the nodes from each one's tensor to it in one stage: add_"):
        pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            gpus=3,
            method="gpipe",
            example_inputs=torch.randn(6, 8),
            loss_fn=F.cross_entropy,
            executor="local",
            profile_dir=None,
        )


class SavedEma(nn.Module):
    """A buffer changed in place, then multiplied with an activation that needs a gradient:
    autograd saves the buffer for that backward."""

    def __init__(self) -> None:
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.o = nn.Linear(8, 4)
        self.register_buffer("ema", torch.zeros(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.ls:
            h = torch.tanh(layer(h))
        self.ema.mul_(0.9).add_(self.ls[1].weight.detach(), alpha=0.1)
        return self.o(h + h @ self.ema)


def test_a_saved_tensor_changed_by_a_later_forward_says_why_and_the_fix() -> None:
    """GPipe runs every micro-batch's forward before the backwards, so the second forward
    changes the ema the first one's backward saved: autograd's bare "modified by an inplace
    operation" told the user nothing (helper-87)."""
    model = SavedEma()
    with (
        pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            gpus=2,
            method="gpipe",
            example_inputs=batches()[0][0],
            loss_fn=F.cross_entropy,
            executor="local",
            profile_dir=None,
        ) as pipe,
        pytest.raises(RuntimeError, match="modified by an inplace operation") as info,
    ):
        pipe.step(*batches()[0])
    assert "read a copy where gradients flow (h @ self.ema.clone()), or train with micro_batches=1" in (
        "\n".join(info.value.__notes__)
    )
