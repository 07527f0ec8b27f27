"""Activation checkpointing a user wrote (``torch.utils.checkpoint``) survives tracing (issue 18)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

import pipeoptim
from pipeoptim.compiler.codegen import run_stages, stage_modules
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.profile import profile_model
from pipeoptim.compiler.recompute import CheckpointRegion
from pipeoptim.compiler.trace import trace
from tests.given_plans import plan_starting_at
from tests.test_training import plain_training


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x))) + x


class Checkpointed(nn.Module):
    """Three residual blocks; each runs under ``checkpoint`` when ``reentrant`` is not None."""

    def __init__(self, reentrant: bool | None = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.reentrant = reentrant
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h) if self.reentrant is None else checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h)


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` runs (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, model = run()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del out
    return sum(n for ptr, n in seen.items() if ptr not in params)


def held_bytes(outputs: tuple[torch.Tensor, ...], model: nn.Module) -> int:
    """Bytes of the distinct storages the autograd graph behind ``outputs`` holds for its
    backward: the saved tensors of its operations (``_saved_*``) and the tensors a custom
    ``autograd.Function`` keeps on its context; floating-point tensors only (not the 5 kB
    RNG state a recomputed region keeps, as ``torch.utils.checkpoint`` does), parameters
    excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}
    todo = [t.grad_fn for t in outputs if t.grad_fn is not None]
    done: set[int] = set()
    while todo:
        fn = todo.pop()
        if id(fn) in done:
            continue
        done.add(id(fn))
        values = [getattr(fn, a) for a in dir(fn) if a.startswith("_saved_")]
        values += list(vars(fn).values()) if hasattr(fn, "__dict__") else []
        for t in pytree.tree_leaves(values):
            if (
                isinstance(t, torch.Tensor)
                and t.is_floating_point()
                and t.untyped_storage().data_ptr() not in params
            ):
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        todo += [f for f, _ in fn.next_functions if f is not None]
    return sum(held.values())


def test_checkpointed_blocks_stay_recomputed_regions_with_the_plain_gradients() -> None:
    model = Checkpointed()
    x = torch.randn(10, 8)
    traced = trace(model, (x,))
    regions = [n for n in traced.gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in regions] == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    assert all(isinstance(traced.gm.get_submodule(str(n.target)), CheckpointRegion) for n in regions)
    assert sorted(traced.gm.state_dict()) == sorted(model.state_dict())
    (traced.gm(x)[0] ** 2).sum().backward()
    (model(x) ** 2).sum().backward()
    traced_params = dict(traced.gm.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(traced_params[name].grad, p.grad, rtol=1e-6, atol=1e-7)


def test_saved_activations_are_those_of_the_checkpointed_plain_model() -> None:
    x = torch.randn(10, 8)
    reference = saved_bytes(lambda: ((m := Checkpointed(reentrant=True))(x), m))
    without = saved_bytes(lambda: ((m := Checkpointed(reentrant=None))(x), m))
    traced = trace(Checkpointed(), (x,))
    graph = profile_model(traced, (x,), warmup=0, repeats=1)
    profiled = sum(n.saved_bytes for n in graph.nodes if n.op != "output")
    config = CostConfig(2, method="gpipe", micro_batches=1)
    plan = plan_starting_at(Checkpointed(), (x,), config, ["blocks_1_up_weight"])
    stages = stage_modules(traced, plan)
    measured = held_bytes(run_stages(stages, (x,)), traced.gm)
    unchecked = Checkpointed(reentrant=None)
    plain = held_bytes((unchecked(x),), unchecked)
    assert plain == without
    assert reference < without / 2
    assert profiled == reference
    assert measured == reference


@pytest.mark.parametrize(("method", "executor"), [("gpipe", "local"), ("1f1b", "processes")])
def test_training_with_checkpointed_blocks_equals_plain_training(method: str, executor: str) -> None:
    model = Checkpointed()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]

    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    expected, reference = plain_training(model, make_opt, batches, micro=2)
    net = copy.deepcopy(model)
    with pipeoptim.compile(
        net,
        make_opt(net),
        2,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        micro_batches=2,
        executor=executor,
        profile_dir=None,
    ) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("method", "micro"), [("pipedream", 1), ("2bw", 3)])
def test_recomputation_under_weight_stashing_changes_no_number(method: str, micro: int) -> None:
    """The recomputation of a region uses the weights the method gives the backward: with
    weight stashing, the version the forward used, so checkpointing changes no number."""
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(9, 8, generator=g), torch.randint(0, 3, (9,), generator=g)) for _ in range(6)]
    results = []
    for reentrant in (None, False):
        model = Checkpointed(reentrant)
        config = CostConfig(3, method=method, micro_batches=micro)
        starts = ["blocks_1_up_weight", "blocks_2_up_weight"]
        plan = plan_starting_at(Checkpointed(reentrant), (batches[0][0][:3],), config, starts)
        with pipeoptim.compile(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            3,
            example_inputs=batches[0][0],
            loss_fn=F.cross_entropy,
            method=method,
            micro_batches=micro if micro > 1 else None,
            executor="local",
            profile_dir=None,
            plan=plan,
        ) as pipe:
            losses = [pipe.step(x, y) for x, y in batches]
            pipe.flush()
            results.append(([loss.item() for loss in losses], pipe.state_dict()))
    (plain_losses, plain_state), (ck_losses, ck_state) = results
    assert ck_losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-7)
    assert plain_losses[-1] != pytest.approx(plain_losses[0])
    for key, value in plain_state.items():
        torch.testing.assert_close(ck_state[key], value, rtol=1e-6, atol=1e-7)


class OnlyExportable(nn.Module):
    """``range`` over a traced size breaks torch.fx; torch.export traces it (and inlines the
    checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.tensor(list(range(x.shape[1]))).float()
        return checkpoint(self.block, x, use_reentrant=False)


def test_checkpointing_lost_to_torch_export_is_named_in_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"torch\.export traced through torch\.utils\.checkpoint on block"):
        traced = trace(OnlyExportable(), (torch.randn(4, 16),))
    assert traced.method == "export"


class CheckpointedLinear(nn.Module):
    """A checkpointed 16 -> 16 linear: dim 1 of its ``[8, 16]`` input looks like a sequence
    length, and the shape probe's shorter inputs fail inside the checkpointed GraphModule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(checkpoint(self.a, x, use_reentrant=False))


def test_a_failing_shape_probe_prints_nothing_and_training_equals_plain(capfd) -> None:
    model = CheckpointedLinear()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]

    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    expected, reference = plain_training(model, make_opt, batches, micro=2)
    net = copy.deepcopy(model)
    capfd.readouterr()
    with pipeoptim.compile(
        net,
        make_opt(net),
        2,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method="1f1b",
        micro_batches=2,
        executor="local",
        profile_dir=None,
    ) as pipe:
        assert capfd.readouterr().err == ""
        got = [pipe.step(x, y).item() for x, y in batches]
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
