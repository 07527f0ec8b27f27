"""Transparency: the stage submodules, run in order, equal the original model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils import _pytree as pytree

from pipeoptim.compiler.codegen import run_stages, stage_modules
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.plan import Plan, make_plan
from pipeoptim.compiler.profile import profile_model
from pipeoptim.compiler.trace import trace
from pipeoptim.errors import CodegenError
from pipeoptim.examples import long_skip, mlp, multi_io, resnet, transformer


def outputs_and_grads(model: torch.nn.Module, run, inputs) -> tuple[list, dict]:
    out = run(*inputs)
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    loss = sum((t.float() ** 2).mean() for t in leaves)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return [t.detach() for t in leaves], grads


@pytest.mark.parametrize("factory", [mlp, resnet, transformer, multi_io, long_skip])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_stages_equal_the_model(factory, stages: int) -> None:
    torch.manual_seed(0)
    model, inputs = factory()
    reference = copy.deepcopy(model)
    traced = trace(model, inputs)
    graph = profile_model(traced, inputs, repeats=1, warmup=0)
    plan = make_plan(graph, CostConfig(stages, bandwidth=1e9))
    modules = stage_modules(traced, plan)
    assert len(modules) == stages and all(m.code for m in modules)
    expected_out, expected_grads = outputs_and_grads(reference, reference, inputs)

    def pipelined(*xs):
        return traced.unflatten_output(run_stages(modules, xs))

    out, grads = outputs_and_grads(model, pipelined, inputs)
    for a, b in zip(out, expected_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-6, atol=1e-6)
    # every parameter lives in exactly one stage, under its original name
    owned = [n for m in modules for n, _ in m.named_parameters()]
    assert len(owned) == len(set(owned))
    assert set(owned) | {a for al in traced.tied.values() for a in al} >= set(grads)


def test_skip_connection_crosses_two_boundaries() -> None:
    model, inputs = long_skip()
    traced = trace(model, inputs)
    graph = profile_model(traced, inputs, repeats=1, warmup=0)
    for node in graph.nodes:  # equal costs: one unwarmed timing must not decide the plan
        if node.time_s > 0:
            node.fwd_s, node.bwd_s = 1e-3, 2e-3
    plan = make_plan(graph, CostConfig(4, bandwidth=1e9))
    skip = next(n.name for n in graph.nodes if n.name == "relu")  # h = relu(inp(x))
    carriers = [k for k, io in enumerate(plan.io) if skip in io.outputs]
    assert plan.stage_of[skip] == 0 and len(carriers) >= 2
    for k in carriers[1:]:
        assert skip in plan.io[k].inputs  # passed through the stages in between


def test_plan_round_trips_through_json(tmp_path) -> None:
    model, inputs = multi_io()
    traced = trace(model, inputs)
    plan = make_plan(profile_model(traced, inputs, repeats=1, warmup=0), CostConfig(3))
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.stage_of == plan.stage_of and again.io == plan.io
    assert again.summary["bottleneck_s"] == plan.summary["bottleneck_s"]
    run = run_stages(stage_modules(traced, again), inputs)
    torch.testing.assert_close(run[0], model(*inputs)[0])


def test_plan_of_another_model_is_refused() -> None:
    model, inputs = mlp(depth=3)
    plan = make_plan(profile_model(trace(model, inputs), inputs, repeats=1, warmup=0), CostConfig(2))
    other, other_inputs = mlp(depth=4)
    with pytest.raises(CodegenError, match="another graph"):
        stage_modules(trace(other, other_inputs), plan)
