"""The compiler: trace -> profile -> partition -> codegen.

:func:`plan_model` runs the first three steps on a model; :mod:`.codegen` turns its plan into
stage submodules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.hooks import hooks_silenced
from pipeoptim.compiler.plan import Plan, make_plan
from pipeoptim.compiler.profile_cache import load_or_profile
from pipeoptim.compiler.trace import TracedModel, trace
from pipeoptim.errors import PlanError


@dataclass
class PlannedModel:
    """A traced model with its cost graph and plan."""

    traced: TracedModel
    graph: CostGraph
    plan: Plan
    profile_reused: bool


def profile_model(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    leaf_modules: Iterable[str] = (),
    profile_dir: str | Path | None = "profiles",
    device: torch.device | str | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[CostGraph, bool]:
    """Trace ``model`` and profile it (or reuse a saved profile): its cost graph, and whether
    the profile was reused (see :func:`plan_model`)."""
    traced = trace(model, example_inputs, leaf_modules)
    with hooks_silenced(traced.gm):  # profiling runs no user hook
        return load_or_profile(traced, example_inputs, profile_dir=profile_dir, device=device, log=log)


def plan_model(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    config: CostConfig,
    *,
    leaf_modules: Iterable[str] = (),
    profile_dir: str | Path | None = "profiles",
    device: torch.device | str | None = None,
    partitioner: str = "ilp",
    solver: str = "auto",
    time_limit: float = 30.0,
    ideals: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
    priced: Callable[[nn.Module, Sequence[torch.Tensor], CostGraph], CostGraph] | None = None,
) -> PlannedModel:
    """Trace ``model``, profile it (or reuse a saved profile) and partition it.

    ``example_inputs`` is one micro-batch (dim 0 is the batch). ``priced(model, inputs,
    graph)``, where given, returns the profile with what the graph leaves out priced (the
    loss: :class:`pipeoptim.loss_cost.LossPricing`). See :func:`.trace.trace`,
    :func:`.profile.load_or_profile` and :func:`.plan.make_plan` for the arguments and the
    errors raised.
    """
    traced = trace(model, example_inputs, leaf_modules)
    with hooks_silenced(traced.gm):  # profiling runs no user hook
        graph, reused = load_or_profile(
            traced, example_inputs, profile_dir=profile_dir, device=device, log=log
        )
    if priced is not None:
        graph = priced(model, example_inputs, graph)
    try:
        plan = make_plan(
            graph, config, partitioner=partitioner, solver=solver, time_limit=time_limit, ideals=ideals
        )
    except PlanError as exc:
        if not traced.auto_leaves:
            raise
        leaves = ", ".join(traced.auto_leaves)
        raise PlanError(
            f"{exc} (tracing made {leaves} a leaf, one node each: the warning says why, and moving "
            "that code into a smaller submodule keeps the rest traced)"
        ) from exc
    return PlannedModel(traced, graph, plan, reused)
