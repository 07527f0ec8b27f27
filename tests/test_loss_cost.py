"""The loss on the last stage, priced (:mod:`pipeoptim.loss_cost`): given example targets,
``compile`` times ``loss_fn``'s forward (with the reduction check where mini-batches are split)
and backward and plans with them on the output node, which every plan puts on the last stage."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.plan import make_plan
from pipeoptim.errors import PipelineError, PlanError, ProfileError
from pipeoptim.loss_cost import LOSS_COSTS_FILE
from pipeoptim.loss_identity import loss_identity

from .conftest import random_cost_graph

WIDTH, LAYERS = 256, 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS)])


def heavy_loss(out: torch.Tensor, y: torch.Tensor, rounds: int = 6) -> torch.Tensor:
    """A loss that costs about ``rounds`` of the model's layers, forward and backward."""
    z = out
    weight = torch.full((WIDTH, WIDTH), 1.0 / WIDTH)
    for _ in range(rounds):
        z = torch.tanh(z @ weight)
    return F.mse_loss(out + z, y)


def _compile(tmp_path: Path, targets: torch.Tensor | None, loss_fn=heavy_loss, said=None, **options):
    x = torch.randn(64, WIDTH)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return pipeoptim.compile(
        model,
        optimizer,
        2,
        example_inputs=x,
        example_targets=targets,
        loss_fn=loss_fn,
        executor="local",
        profile_dir=tmp_path,
        log=(said if said is not None else []).append,
        **options,
    )


def _layers_on_last_stage(plan) -> int:
    return sum(1 for node, stage in plan.stage_of.items() if stage == 1 and node.startswith("linear"))


def test_a_priced_loss_moves_layers_off_the_last_stage(tmp_path: Path) -> None:
    """Without targets the two stages get 4 layers each and the plan says the loss is left
    out; with them the loss (about 6 layers' work) counts on stage 1: its fwd and bwd columns
    add the loss's figures to its nodes', and the planner gives it fewer layers. Training
    on the priced plan gives the loss the plain model gives."""
    y = torch.randn(64, WIDTH)
    said: list[str] = []
    plain = _compile(tmp_path, None, said=said)
    assert any("leaves the loss out" in line for line in said)
    assert plain.plan.summary["loss"] is None and "loss            not in the plan" in plain.plan.table()
    plain.close()
    said.clear()
    pipe = _compile(tmp_path, y, said=said)
    loss = pipe.plan.summary["loss"]
    assert any(line.startswith("loss on the last stage (timed)") for line in said), said
    last = pipe.plan.stages[-1]
    graph_nodes = [n for n, s in pipe.plan.stage_of.items() if s == 1]
    assert "output" in graph_nodes and last.fwd_s >= loss["fwd_s"] > 0 and last.bwd_s >= loss["bwd_s"] > 0
    assert f"fwd {loss['fwd_s'] * 1e3:.3f} + bwd {loss['bwd_s'] * 1e3:.3f} ms" in pipe.plan.table()
    assert _layers_on_last_stage(pipe.plan) < _layers_on_last_stage(plain.plan)
    x = torch.randn(64, WIDTH)
    expected = heavy_loss(_model()(x), y).detach()
    assert float(pipe.step(x, y)) == pytest.approx(float(expected), rel=1e-6)
    pipe.close()


def test_the_figures_are_kept_per_loss_and_targets(tmp_path: Path) -> None:
    """A second compile of the same setting reads the saved figures (the same plan, not
    timing noise); another loss function, other loss settings or other targets are timed."""
    y = torch.randn(64, WIDTH)
    said: list[str] = []
    first = _compile(tmp_path, y, said=said)
    first.close()
    again = _compile(tmp_path, y, said=said)
    again.close()
    assert any(
        line.startswith(f"loss on the last stage (reused from {tmp_path / LOSS_COSTS_FILE})") for line in said
    )
    assert again.plan.summary["loss"] == first.plan.summary["loss"]
    assert again.plan.stage_of == first.plan.stage_of
    _compile(tmp_path, y, loss_fn=functools.partial(heavy_loss, rounds=1)).close()
    _compile(tmp_path, y.double().float()[:, :1].expand(64, WIDTH).contiguous(), said=said).close()
    _compile(tmp_path, y, method="gpipe", micro_batches=2, said=said).close()  # checked, 32 rows
    table = json.loads((tmp_path / LOSS_COSTS_FILE).read_text())
    assert len(table) == 3  # the same targets' shapes are one entry; the partial and gpipe's two more
    assert any("with its reduction check" in line and "32 rows" in line for line in said)


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_targets_the_loss_fails_on_are_named(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="loss_fn fails on the model's output and example_targets"):
        _compile(tmp_path, torch.randn(64, 3))
    # targets step() would refuse (rows that do not split like the inputs'), refused as it does
    with pytest.raises(PipelineError, match=r"targets is a tensor of shape \[128, 256\], 128 along dim 0"):
        _compile(tmp_path, torch.randn(128, WIDTH), method="gpipe", micro_batches=2)


def test_a_loss_that_reaches_no_output_is_refused_and_compile_under_no_grad_times_it(tmp_path: Path) -> None:
    """A loss of a value rebuilt from .item() needs a gradient but reaches none of the
    model's output: training would change no weight (helper-174: it trained on, silently).
    A compile under torch.no_grad times the loss with gradients, as the stages compute it
    (autograd's raw error before)."""
    y = torch.randn(64, WIDTH)

    def rebuilt(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tensor(F.mse_loss(out, t).item(), requires_grad=True)

    with pytest.raises(PipelineError, match="does not depend on the model's output"):
        _compile(tmp_path, y, loss_fn=rebuilt)
    with torch.no_grad():
        pipe = _compile(tmp_path, y)
    assert pipe.plan.summary["loss"]["bwd_s"] > 0
    pipe.close()


def test_a_loss_of_a_complex_output_or_changing_it_in_place_is_timed(tmp_path: Path) -> None:
    """As the stages run them (helper-175: compile refused both): the loss of an FFT's complex
    output, and a loss that divides the output in place (each evaluation on the same values)."""
    x, y = torch.randn(16, 8), torch.randint(0, 8, (16,))

    class Spectral(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.fft.fft(self.b(torch.tanh(self.a(inputs))))

    def halved(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.abs().div_(2.0), t)

    def halves_its_output(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.real.div_(2.0), t)

    for loss_fn in (halved, halves_its_output):
        torch.manual_seed(0)
        model = Spectral()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pipeoptim.compile(
            model,
            optimizer,
            2,
            example_inputs=x,
            example_targets=y,
            loss_fn=loss_fn,
            executor="local",
            profile_dir=tmp_path,
        ) as pipe:
            assert pipe.plan.summary["loss"]["bwd_s"] > 0
            torch.manual_seed(0)
            expected = loss_fn(Spectral()(x), y).detach()
            assert float(pipe.step(x, y)) == pytest.approx(float(expected), rel=1e-6)


def test_the_callers_targets_are_left_as_they_are(tmp_path: Path) -> None:
    """A loss that changes its targets in place changes copies (it changed the caller's,
    a view of the training set, helper-173)."""

    def clamping(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y.clamp_(min=0.0)
        return F.mse_loss(out, y)

    y = torch.randn(64, WIDTH)
    before = y.clone()
    _compile(tmp_path, y, loss_fn=clamping, method="gpipe", micro_batches=2).close()
    assert torch.equal(y, before)


def test_a_loss_that_is_not_the_reduction_said_is_refused_by_compile(tmp_path: Path) -> None:
    """Where mini-batches are split, the priced loss runs the run's reduction check: a sum
    declared as a mean is refused by compile, with the message the first step would give."""

    def summed(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y, reduction="sum")

    with pytest.raises(PipelineError, match="pass loss_reduction='sum'"):
        _compile(tmp_path, torch.randn(64, WIDTH), loss_fn=summed, method="gpipe", micro_batches=2)


def _sum_of(a: torch.Tensor, b: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    if reduction not in {"sum", "mean", "none"}:  # a frozenset constant: its order follows the hash seed
        raise ValueError(reduction)
    return (a - b).sum()


ROUNDS = 1  # a module-level setting the losses below read


class _ReadsGlobal:
    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y) * ROUNDS


class _ClassAttribute:
    rounds = 1

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y) * self.rounds


class _Inherits(_ClassAttribute):
    pass


def _repeated(rounds: int):
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(F.mse_loss(out, y) for _ in range(rounds)) / rounds

    return loss


class _Scaled:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y) * self.factor

    def method(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y) * self.factor


class _HeadLoss(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(WIDTH, classes)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(out), y)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(out, y)


@dataclasses.dataclass
class _Inner:
    repeat: int


@dataclasses.dataclass
class _Config:
    inner: _Inner


class _Slotted:
    __slots__ = ("repeat",)

    def __init__(self, repeat: int) -> None:
        self.repeat = repeat

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y) * self.repeat


class _Static:
    @staticmethod
    def __call__(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y)


def _closing_over(value: object):
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y) * len(repr(value))

    return loss


def _exec_class(body: str) -> type:
    scope = {"__name__": "__main__", "nn": nn, "F": F}
    exec(f"class Loss(nn.Module):\n    def forward(self, o, y):\n        return {body}\n", scope)
    return scope["Loss"]


def test_loss_identity_names_the_computation_in_any_process() -> None:
    """Every pair differs in what the loss computes, so none may reuse the other's figure:
    two lambdas, two defaults, closures over another count, callable objects and bound methods
    of another state, modules of other settings, weights or submodules (helper-173: a loss
    module with a head of 100,000 classes reused the figure of one of 10, 800x too cheap),
    partials of other arguments. No memory address: another process reads the same (the
    cache is shared between runs)."""
    pairs = [
        ((lambda a, b: (a - b).sum()), (lambda a, b: (a * b).sum())),
        ((lambda a, b, k=1: a.sum() * k), (lambda a, b, k=1000: a.sum() * k)),
        (_repeated(1), _repeated(200)),
        (_Scaled(1.0), _Scaled(2.0)),
        (_Scaled(1.0).method, _Scaled(2.0).method),
        (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1)),
        (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=torch.ones(10))),
        (_HeadLoss(10), _HeadLoss(100_000)),
        (
            functools.partial(F.cross_entropy, ignore_index=0),
            functools.partial(F.cross_entropy, ignore_index=1),
        ),
        (F.cross_entropy, _sum_of),
        # beyond the profile's depth or what it keys (helper-174: each pair shared one entry)
        (_HeadLoss(10).loss, _HeadLoss(20_000).loss),
        (_closing_over(nn.Sequential(nn.Linear(4, 10))), _closing_over(nn.Sequential(nn.Linear(4, 10**5)))),
        (_closing_over({"head": nn.Linear(4, 10)}), _closing_over({"head": nn.Linear(4, 10**5)})),
        (_closing_over(_Config(_Inner(1))), _closing_over(_Config(_Inner(200)))),
        (_Slotted(1), _Slotted(200)),
        (functools.partial(_sum_of, b=_repeated(1)), functools.partial(_sum_of, b=_repeated(200))),
        (_exec_class("F.mse_loss(o, y)")(), _exec_class("F.mse_loss(o, y) + F.l1_loss(o, y)")()),
        (_Static(), _Scaled(1.0)),
    ]
    for first, second in pairs:
        assert loss_identity(first) != loss_identity(second), (first, second)
        assert loss_identity(first) == loss_identity(first) and "0x" not in loss_identity(first)
    # what a class holds or its methods read, changed between two compiles (helper-175)
    global ROUNDS
    before = [loss_identity(x) for x in (_ReadsGlobal(), _ClassAttribute(), _Inherits())]
    before.append(loss_identity(_closing_over(np.ones(1))))
    ROUNDS, _ClassAttribute.rounds = 50, 50
    try:
        after = [loss_identity(x) for x in (_ReadsGlobal(), _ClassAttribute(), _Inherits())]
    finally:
        ROUNDS, _ClassAttribute.rounds = 1, 1
    after.append(loss_identity(_closing_over(np.ones(50))))
    assert all(b != a for b, a in zip(before, after)), (before, after)
    assert loss_identity(nn.CrossEntropyLoss()) == loss_identity(nn.CrossEntropyLoss())
    assert loss_identity(_repeated(3)) == loss_identity(_repeated(3))
    cyclic: list = []
    cyclic.append(cyclic)
    assert loss_identity(_closing_over(cyclic)) == loss_identity(_closing_over(cyclic))
    # a container by its length and first 256 items, so that a large one keys quickly (a
    # million-entry dict took 1.2 s, a 300 x 300 x 300 list 2.9 s, helper-174 and 175): two
    # that differ only beyond them share the key, by design
    big = {i: i for i in range(10**6)}
    assert loss_identity(_closing_over(big)) == loss_identity(_closing_over({**big, 300: -1}))
    loss_identity(_closing_over([[list(range(300))] * 300] * 300))  # 27 million items, shared
    code = "from tests.test_loss_cost import _sum_of; from pipeoptim.loss_identity import loss_identity; "
    code += "print(loss_identity(_sum_of))"
    root = Path(__file__).resolve().parent.parent
    for seed in ("1", "2"):  # the set literal in _sum_of is ordered by the hash seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        other = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env
        )
        assert other.stdout.strip() == loss_identity(_sum_of)


@pytest.mark.parametrize("partitioner", ["ilp", "uniform", "chain_dp"])
def test_a_stage_never_holds_the_loss_alone(partitioner: str) -> None:
    """The output node's time is the loss's: it makes no stage (a stage of the loss alone
    would have no layer and no parameter), so two layers still make at most 2 stages."""
    drawn = random_cost_graph(random.Random(0), 2, max_inputs=1)
    nodes = [*drawn.nodes[:-1], replace(drawn.nodes[-1], fwd_s=5.0, bwd_s=5.0)]
    graph = CostGraph(drawn.model, nodes, batch_size=1)
    with pytest.raises(PlanError, match="use at most 2 stages"):
        make_plan(graph, CostConfig(3), partitioner=partitioner)
    plan = make_plan(graph, CostConfig(2), partitioner=partitioner)
    assert plan.stage_of == {"x": 0, "n0": 0, "n1": 1, "output": 1}
    assert plan.stages[1].fwd_s == pytest.approx(nodes[2].fwd_s + 5.0)
