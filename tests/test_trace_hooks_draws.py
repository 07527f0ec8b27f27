"""Gradient hooks and Python's random numbers in a forward: a traced graph dropped the hook and
drew the numbers once, at tracing, without a word (helper-127). The module doing either is
now a leaf that runs as written (the root's own forward is refused with the fix)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.partition import PartitionResult
from pipeoptim.compiler.plan import plan_from_assignment
from pipeoptim.compiler.profile_cache import load_or_profile
from pipeoptim.compiler.trace import trace
from pipeoptim.errors import TraceError

from .test_user_models import assert_equal_training, full_batch_training, loader, pipelined


class _ScaledGradient(nn.Module):
    """Scales the gradient flowing back into what came before it (a gradient-reversal layer's
    pattern), by a hook registered in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(x))
        h.register_hook(lambda g: g * 0.1)
        return h


class _HookedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.scaled, self.b = nn.Linear(6, 16), _ScaledGradient(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.scaled(torch.relu(self.a(x))))


class _HookInRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h.register_hook(lambda g: g * 0.1)
        return self.b(h)


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_a_gradient_hook_in_a_submodule_runs_as_in_the_plain_model(method: str) -> None:
    torch.manual_seed(0)
    model, batches = _HookedNet(), loader()[:3]
    expected = full_batch_training(model, batches, F.cross_entropy)
    with pytest.warns(UserWarning, match=r"made these modules leaves.*scaled \(registers a gradient hook"):
        got = pipelined(model, batches, F.cross_entropy, method)
    assert_equal_training(got, expected)


def test_a_gradient_hook_in_the_root_forward_is_refused_with_the_fix() -> None:
    with pytest.raises(
        TraceError, match=r"_HookInRoot.forward registers a gradient hook .*Fix: move that code"
    ):
        trace(_HookInRoot(), torch.randn(4, 6))


RAN: list[int] = []  # which blocks ran, in the local executor (this process)


class _LayerDrop(nn.Module):
    """Stochastic depth: skipped when Python's (or NumPy's) generator says so."""

    def __init__(self, index: int, numpy: bool = False) -> None:
        super().__init__()
        self.index, self.numpy, self.lin = index, numpy, nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        draw = np.random.rand() if self.numpy else random.random()
        if draw < 0.5:
            return x
        RAN.append(self.index)
        return x + torch.tanh(self.lin(x))


class _DropNet(nn.Module):
    def __init__(self, numpy: bool = False) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 4)
        self.blocks = nn.ModuleList([_LayerDrop(i, numpy) for i in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class _DrawInRoot(_DropNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inp(x) * (2.0 if random.random() < 0.5 else 1.0))


@pytest.mark.parametrize("numpy", [False, True], ids=["random", "numpy"])
def test_blocks_drawing_from_python_generators_draw_at_every_forward(numpy: bool) -> None:
    """Traced, each block's ``random.random() < 0.5`` was drawn once: two of the four blocks
    left the graph for good and never trained, the other two always ran. As leaves they draw
    at every forward, from generators seeded per micro-batch: the processes executor gives
    the local one's numbers."""
    torch.manual_seed(0)
    model, batches = _DropNet(numpy), loader()[:3]
    state = random.getstate()
    with pytest.warns(UserWarning, match=r"blocks.0 \(draws from Python's random module"):
        assert set(trace(model, batches[0][0]).auto_leaves) == {f"blocks.{i}" for i in range(4)}
    assert random.getstate() == state  # tracing took none of the caller's numbers
    *local, plan = _trained(model, batches, "local")
    counts = [RAN.count(i) for i in range(4)]  # 3 mini-batches of 4 micro-batches each
    assert all(0 < n < 12 for n in counts), counts
    assert_equal_training(_trained(model, batches, "processes", plan)[:2], tuple(local))


def _trained(
    model: nn.Module, batches: list, executor: str, plan=None
) -> tuple[list[float], dict, pipeoptim.Plan]:
    """Losses, weights and plan of 1f1b training; :data:`RAN` holds the blocks run by its steps.
    Given back the plan, a run repeats the cut: a block draws from its stage's streams."""
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    options = {"loss_fn": F.cross_entropy, "method": "1f1b", "micro_batches": 4, "executor": executor}
    options |= {"example_inputs": batches[0][0], "profile_dir": None, "plan": plan}
    state = random.getstate()
    with pipeoptim.compile(net, optimizer, 2, **options) as pipe:
        assert random.getstate() == state  # profiling ran the blocks, on its own numbers
        RAN.clear()  # not the runs of tracing and profiling
        losses = [pipe.step(x, y).item() for x, y in batches]
        assert random.getstate() == state  # the local stages draw from their own streams
        return losses, pipe.state_dict(), pipe.plan


def test_a_draw_in_the_root_forward_is_refused_with_the_fix() -> None:
    state = random.getstate()
    with pytest.raises(
        TraceError, match=r"_DrawInRoot.forward draws from Python's random .*Fix: move that code"
    ):
        trace(_DrawInRoot(), torch.randn(4, 6))
    assert random.getstate() == state


def test_a_recomputed_stage_redraws_what_its_forward_drew() -> None:
    """Planned recomputation (where memory= binds) ran the stage again in the backward with
    torch's generator restored only: the blocks redrew from the caller's Python generator
    (weights 0.026 off the same plan without recomputation after 4 steps; helper-131)."""
    torch.manual_seed(0)
    model = _DropNet()
    batches = loader()[:3]
    x = batches[0][0][:4]  # one micro-batch of 4
    graph, _ = load_or_profile(trace(copy.deepcopy(model), (x,)), (x,), profile_dir=None)
    config = CostConfig(2, method="1f1b", micro_batches=4)
    stage_of = [
        0 if n.module.startswith(("inp", "blocks")) or n.op == "placeholder" else 1 for n in graph.nodes
    ]
    runs = []
    for flags in ([True, False], [False, False]):
        given = PartitionResult(stage_of, "given", "", "given", False, None, 0.0, len(stage_of), flags)
        plan = plan_from_assignment(graph, config, given)
        net = copy.deepcopy(model)
        options = {"loss_fn": F.cross_entropy, "method": "1f1b", "micro_batches": 4, "profile_dir": None}
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with pipeoptim.compile(
            net, opt, 2, example_inputs=batches[0][0], plan=plan, executor="local", **options
        ) as pipe:
            random.seed(1234)  # the caller's own stream, which the recomputation drew from
            runs.append(([pipe.step(xb, yb).item() for xb, yb in batches], pipe.state_dict()))
    assert runs[0][0] == runs[1][0]
    for key, value in runs[1][1].items():
        assert torch.equal(runs[0][1][key], value), key
