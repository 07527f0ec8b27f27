"""Codegen: one ``torch.fx.GraphModule`` per stage, with readable ``.code``.

Stage k's graph has one placeholder per value it receives (``plan.io[k].inputs``), the nodes
the plan puts in stage k, in graph order, and returns the tuple of values it sends
(``plan.io[k].outputs``); values that only pass through (a skip connection crossing several
boundaries) go straight from a placeholder to the output. The last stage returns the flat
model outputs; :meth:`pipeoptim.compiler.trace.TracedModel.unflatten_output` rebuilds the
model's output type from them.

``torch.fx.passes.split_module`` routes every value from its producer straight to its users;
the stage interface here instead sends each stage only its neighbour's values (the
pass-through the cost model counts), so the graphs are built with fx's ``node_copy``.
Parameters, buffers and leaf modules are shared with the traced model (not copied) and keep
their qualified names, so a stage's ``state_dict()`` uses the original model's keys. A shared
parameter (``plan.shared``, :mod:`pipeoptim.compiler.shared`) is a ``get_attr`` in every stage
that reads it; the runtime gives each of those stages its own copy. A stage the plan lets
recompute (:attr:`Plan.recompute <pipeoptim.compiler.plan.Plan.recompute>`) runs its operations
as one recomputed region (:mod:`pipeoptim.compiler.stage_recompute`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.stage_recompute import recompute_stage
from pipeoptim.compiler.trace import TracedModel
from pipeoptim.errors import CodegenError
from pipeoptim.units import first_few


def check_plan_matches(traced: TracedModel, plan: Plan) -> None:
    """Raise :class:`CodegenError` if ``plan`` was made for another graph than ``traced``."""
    planned = plan.profile_key.get("graph_hash")
    if planned and planned != traced.graph_hash:
        # a plan given for another model is refused before (pipeoptim.given_plan): here, a stage
        # in a worker process or torchrun rank traced the model otherwise than the planning process
        raise CodegenError(
            f"the plan was made for another graph of {plan.model!r} (graph hash "
            f"{planned[:12]} vs {traced.graph_hash[:12]} here): make a new plan for this model; in "
            "a worker process or torchrun rank, the model reads something that differs between "
            "processes, such as a module-level value the script set after importing its module "
            "(a worker imports it again) or an environment variable: set it where the module is "
            "defined, or use executor='local'"
        )
    names = {n.name for n in traced.gm.graph.nodes}
    missing = sorted(set(plan.stage_of) ^ names)
    if missing:
        raise CodegenError(f"plan and graph disagree on nodes ({', '.join(missing[:5])}...); make a new plan")
    wrong = {n: k for n, k in plan.stage_of.items() if not (isinstance(k, int) and 0 <= k < plan.num_stages)}
    if wrong:
        raise CodegenError(
            f"the plan puts nodes outside its {plan.num_stages} stages ({_listed(wrong)}); make a new plan"
        )
    _check_io(traced, plan)
    sent = {name for io in plan.io[:-1] for name in io.outputs}  # the model's output is not sent on
    for name, value in plan.values.items():
        if name in sent and (
            value.get("container") == "nested"
            or any(m["kind"] in ("module", "other") for m in value.get("meta", []))
        ):
            kinds = sorted({m["kind"] for m in value.get("meta", [])})
            raise CodegenError(
                f"value {name!r} ({value.get('container') or '/'.join(kinds)}) crosses a stage "
                "boundary but only tensors, numbers and flat tuples of them can be sent; make "
                "the module that produces it a leaf module so it stays inside one stage"
            )


def _check_io(traced: TracedModel, plan: Plan) -> None:
    """Raise :class:`CodegenError` where the plan's boundaries (``io``, ``values``, one entry
    per stage) are not those its ``stage_of`` gives on ``traced``
    (:func:`pipeoptim.compiler.plan.stage_io`): a hand edit of ``io`` trained another model,
    silently (a stage sent a value its neighbour took for another), or failed deep in the
    runtime (helper-136)."""
    n = plan.num_stages
    if not len(plan.io) == len(plan.stages) == n:
        raise CodegenError(
            f"the plan has {len(plan.io)} stage boundaries and {len(plan.stages)} stage figures for its "
            f"{n} stages (a plan edited by hand?); make a new plan"
        )
    inputs = [node.name for node in traced.gm.graph.nodes if node.op == "placeholder"]
    if list(plan.io[0].inputs) != inputs:  # bound in this order: x and y swapped, silently (helper-139)
        raise CodegenError(
            f"the plan's first stage receives {_bracketed(plan.io[0].inputs)}, where the model's inputs are "
            f"{_bracketed(inputs)} (a plan edited by hand?); make a new plan"
        )
    crossing: list[set[str]] = [set() for _ in range(n - 1)]
    for node in traced.gm.graph.nodes:
        if node.users and node.name not in plan.shared:
            last = max(plan.stage_of[user.name] for user in node.users)
            for b in range(plan.stage_of[node.name], last):
                crossing[b].add(node.name)
    for b, names in enumerate(crossing):
        sends, receives = plan.io[b].outputs, plan.io[b + 1].inputs
        if set(sends) != names or list(receives) != list(sends):
            raise CodegenError(
                f"the plan's boundary after stage {b} sends {_bracketed(sends)} and the next stage receives "
                f"{_bracketed(receives)}, where its stages exchange {_bracketed(sorted(names))} (a plan "
                "edited by hand?); make a new plan"
            )
    unknown = sorted({name for names in crossing for name in names} - set(plan.values))
    if unknown:
        raise CodegenError(f"the plan describes no value {_bracketed(unknown)} it sends; make a new plan")


def _bracketed(names: Sequence[str]) -> str:
    """``[a, b, ...]`` of the first five names (:func:`pipeoptim.units.first_few`)."""
    return f"[{first_few(names, 5, '')}]"


def stage_module(traced: TracedModel, plan: Plan, stage: int) -> fx.GraphModule:
    """The submodule of stage ``stage``: ``module(*inputs) -> tuple(outputs)``.

    Raises:
        CodegenError: the plan does not match the traced graph.
    """
    check_plan_matches(traced, plan)
    io = plan.io[stage]
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in io.inputs:
        env[name] = graph.placeholder(name)
    output_node = None
    for node in traced.gm.graph.nodes:
        if node.op == "output":
            output_node = node
            continue
        holders = plan.shared.get(node.name)
        here = stage in holders if holders is not None else plan.stage_of[node.name] == stage
        if node.op == "placeholder" or not here:
            continue
        env[node.name] = graph.node_copy(node, lambda n, node=node: _known(env, n, node, stage))
    last = stage == plan.num_stages - 1
    if last:
        assert output_node is not None
        result = fx.node.map_arg(output_node.args[0], lambda n: _known(env, n, output_node, stage))
    else:
        missing = [name for name in io.outputs if name not in env]
        if missing:
            raise CodegenError(
                f"stage {stage} of the plan sends {', '.join(missing[:5])}, which it neither computes nor "
                "receives (a plan edited by hand?); make a new plan"
            )
        result = tuple(env[name] for name in io.outputs)
    graph.output(result)
    graph.lint()
    gm = fx.GraphModule(traced.gm, graph, class_name=f"Stage{stage}")
    if plan.recompute[stage]:
        recompute_stage(gm)
    return gm


def _known(env: dict[str, fx.Node], value: fx.Node, reader: fx.Node, stage: int) -> fx.Node:
    """``value`` as stage ``stage`` has it, for ``reader``.

    Raises:
        CodegenError: the stage neither computes nor receives it (the plan's stages and its
            boundaries disagree, or an edge runs backwards)."""
    if value.name not in env:
        raise CodegenError(
            f"in the plan, {reader.name} at stage {stage} reads {value.name}, which stage {stage} neither "
            "computes nor receives (a plan edited by hand, or an edge running backwards); make a new plan"
        )
    return env[value.name]


def _listed(stages: dict[str, object]) -> str:
    """``name -> stage`` of the first few entries."""
    return ", ".join(f"{n} -> {k!r}" for n, k in list(stages.items())[:5])


def stage_modules(traced: TracedModel, plan: Plan) -> list[fx.GraphModule]:
    """All stage submodules, in order."""
    return [stage_module(traced, plan, k) for k in range(plan.num_stages)]


def run_stages(stages: Sequence[torch.nn.Module], inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Run the stages in order on one micro-batch; returns the flat model outputs."""
    values: tuple[Any, ...] = tuple(inputs)
    for module in stages:
        values = module(*values)
    return values
