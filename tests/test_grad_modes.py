"""The stages train in their own modes, whatever the caller's (pipeoptim.runtime.grad_modes):
a flush inside the caller's ``torch.inference_mode()`` or ``torch.autocast`` (``predict``
flushes first) trains as one outside them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import pipeoptim
from pipeoptim.compiler import plan_model, profile_model
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.loss_cost import LossPricing
from pipeoptim.runtime.grad_modes import training_modes

from .test_training import data, no_dropout_cnn

CALLERS = {
    "inference mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "bfloat16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "saved-tensor hooks disabled": lambda: torch.autograd.graph.disable_saved_tensors_hooks("the caller's"),
}


def trained(method: str, caller, plan=None) -> tuple[dict[str, torch.Tensor], pipeoptim.Plan]:
    """Weights after 6 mini-batches, predicting (and so flushing) after the second and the
    fourth under ``caller``: the steps between, outside it, update what the flush made; and
    the plan (given back, a run repeats the cut, on which PipeOptim's numbers depend: two runs
    planning each under load cut differently, red once in the full suite)."""
    torch.manual_seed(0)
    model = no_dropout_cnn()
    batches = data(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(
        model,
        opt,
        2,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        executor="local",
        profile_dir=None,
        plan=plan,
    ) as pipe:
        for i, (x, y) in enumerate(batches):
            pipe.step(x, y)
            if i in (1, 3):
                with caller():
                    pipe.predict(x)
        return pipe.state_dict(), pipe.plan


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("method", ["1f1b", "pipeoptim"])
def test_a_flush_in_the_callers_modes_trains_as_one_outside_them(method: str, caller: str) -> None:
    """Under inference mode SGD's momentum buffer became an inference tensor the next step
    could not update (1f1b), and PipeOptim's prediction failed; under a bfloat16 autocast the
    cool-down's backward and step ran in bfloat16 (helper-148)."""
    want, plan = trained(method, contextlib.nullcontext)
    got, _ = trained(method, CALLERS[caller], plan)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def _compiled(caller, folder: Path | None, said: list[str], method: str = "1f1b") -> pipeoptim.Pipeline:
    model = no_dropout_cnn()
    x, y = data(1)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with caller():
        return pipeoptim.compile(
            model,
            opt,
            2,
            example_inputs=x,
            example_targets=y,
            loss_fn=F.cross_entropy,
            method=method,
            executor="local",
            profile_dir=folder,
            log=said.append,
        )


def _profile(folder: Path) -> CostGraph:
    (path,) = folder.glob("SmallCNN-*.json")
    graph = CostGraph.load(path)
    assert isinstance(graph, CostGraph)
    return graph


@pytest.mark.parametrize("caller", list(CALLERS))
def test_compile_in_the_callers_modes_profiles_as_the_stages_train(caller: str, tmp_path: Path) -> None:
    """compile() inside the caller's modes profiles, prices the loss and plans as outside them,
    and its cached profile serves a later compile: under no_grad the backward was timed as
    0 s on an MLP (cached so, for every later compile of the model) and failed on this CNN as
    if the example inputs were wrong, under inference mode the profile failed so, and under a
    bfloat16 autocast the stages were profiled in bfloat16, which they do not train in."""
    said: list[str] = []
    with _compiled(contextlib.nullcontext, tmp_path / "plain", said) as plain:
        want = [float(plain.step(x, y)) for x, y in data(4)]
    with _compiled(CALLERS[caller], tmp_path / "called", said) as pipe:
        got = [float(pipe.step(x, y)) for x, y in data(4)]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    plain_graph, graph = _profile(tmp_path / "plain"), _profile(tmp_path / "called")
    assert graph.key == plain_graph.key and "autocast" not in graph.key
    for a, b in zip(plain_graph.nodes, graph.nodes, strict=True):
        assert (b.name, b.out_bytes, b.saved_bytes) == (a.name, a.out_bytes, a.saved_bytes)
        assert (b.bwd_s > 0) == (a.bwd_s > 0), b.name
    assert sum(n.bwd_s for n in graph.nodes) > 0
    said.clear()
    with _compiled(contextlib.nullcontext, tmp_path / "called", said):  # reuses that profile
        assert any(line.startswith("reusing profile") for line in said), said


@pytest.mark.parametrize("caller", ["inference mode", "no_grad", "saved-tensor hooks disabled"])
def test_the_compilers_profile_times_the_backward_in_the_callers_modes(caller: str) -> None:
    """pipeoptim.compiler.profile_model (as `pipeoptim partition` and plan_model profile); with
    the saved-tensor hooks disabled it failed (its count of saved activations uses them)."""
    with CALLERS[caller]():
        graph, _ = profile_model(no_dropout_cnn(), (data(1)[0][0],), profile_dir=None)
    assert all(n.bwd_s > 0 for n in graph.nodes if n.op.startswith("call"))  # every op's backward


@pytest.mark.parametrize("caller", list(CALLERS))
def test_steps_in_the_callers_modes_train_as_steps_outside_them(caller: str, tmp_path: Path) -> None:
    """Under inference mode step()'s copies of the micro-batches (the local executor, rank 0
    under torchrun) were inference tensors, which the forward could not save for its backward;
    with the saved-tensor hooks disabled, PipeOptim's forward failed (helper-180)."""
    losses = []
    for modes in (contextlib.nullcontext, CALLERS[caller]):
        with _compiled(
            contextlib.nullcontext, tmp_path, [], "pipeoptim"
        ) as pipe:  # the second reuses the profile
            given = []
            for x, y in data(4):
                with modes():
                    given.append(pipe.step(x, y))
            losses.append([float(loss) for loss in given])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("caller", list(CALLERS))
def test_predict_and_to_module_in_the_callers_modes_give_what_they_give_outside(caller: str) -> None:
    """helper-180: predict() under a caller's bfloat16 autocast ran the local executor's stages
    in bfloat16 (worker processes, which the caller's autocast does not reach, in float32), and
    to_module() under inference mode built a model of inference tensors, which no backward
    could train."""
    x, y = data(1)[0]
    with _compiled(contextlib.nullcontext, None, []) as pipe:
        pipe.step(x, y)
        want = pipe.predict(x)
        with CALLERS[caller]():
            got, module = pipe.predict(x), pipe.to_module()
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert not any(p.is_inference() for p in module.parameters())
    F.cross_entropy(module(x), y).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_optimizer_state_loaded_in_inference_mode_trains_on(tmp_path: Path) -> None:
    """Loaded inside the caller's inference mode, the stages' optimizer state (copies) became
    inference tensors the next step could not update in place (Adam's step count; the local
    executor and rank 0 under torchrun)."""
    batches = data(6)
    pipes = [_compiled(contextlib.nullcontext, tmp_path, []) for _ in range(2)]
    for x, y in batches[:3]:
        pipes[0].step(x, y)
    weights, state = pipes[0].state_dict(), pipes[0].optimizer_state_dict()
    with torch.inference_mode():
        pipes[1].load_state_dict(weights)
        pipes[1].load_optimizer_state_dict(state)
    losses = [[float(p.step(x, y)) for x, y in batches[3:]] for p in pipes]
    assert losses[0] == losses[1]
    for name, value in pipes[0].state_dict().items():
        assert torch.equal(pipes[1].state_dict()[name], value), name
    for p in pipes:
        p.close()


def test_training_modes_restore_the_callers() -> None:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with training_modes():
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_inference_mode_enabled() and torch.is_autocast_enabled("cpu")
    with torch.no_grad():
        with training_modes():
            assert torch.is_grad_enabled()
        assert not torch.is_grad_enabled()


@pytest.mark.parametrize("executor", ["local", "processes"])
def test_state_dicts_taken_in_inference_mode_are_tensors_to_train_from(executor: str) -> None:
    """Taken inside the caller's inference mode, state_dict(), optimizer_state_dict() and
    stage_state_dicts() (helper-184) gave inference tensors (their copies were made there),
    which no in-place update outside it may change (torch's own state_dict() gives normal
    tensors there)."""
    model = no_dropout_cnn()
    batches = data(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(
        model, opt, 2, example_inputs=batches[0][0], loss_fn=F.cross_entropy, executor=executor
    ) as pipe:
        for x, y in batches[:2]:
            pipe.step(x, y)
        want = pipe.state_dict(), pipe.optimizer_state_dict(), pipe.stage_state_dicts()
        with torch.inference_mode():
            got = pipe.state_dict(), pipe.optimizer_state_dict(), pipe.stage_state_dicts()
    pairs = list(zip(pytree.tree_leaves(want), pytree.tree_leaves(got)))
    tensors = [(w, g) for w, g in pairs if isinstance(g, torch.Tensor)]
    assert len(tensors) > len(want[0])  # the weights and the momentum buffers
    for w, g in tensors:
        assert not g.is_inference() and torch.equal(g, w)
        g.zero_()  # an inference tensor refuses this outside inference mode
    assert all(w == g for w, g in pairs if not isinstance(g, torch.Tensor))


@pytest.mark.parametrize("caller", ["inference mode", "no_grad", "saved-tensor hooks disabled"])
def test_the_loss_priced_through_the_compiler_in_the_callers_modes(caller: str) -> None:
    """plan_model with a LossPricing (as compile prices the loss) under the caller's inference
    mode refused the loss as one "that needs no gradient" (helper-184)."""
    x, y = data(1)[0]
    priced = LossPricing(F.cross_entropy, "mean", y, len(y), torch.device("cpu"), None, lambda _: None)
    with CALLERS[caller]():
        planned = plan_model(
            no_dropout_cnn(), (x,), CostConfig(num_stages=2), profile_dir=None, priced=priced
        )
    loss = planned.graph.info["loss"]
    assert loss["fwd_s"] > 0 and loss["bwd_s"] > 0
