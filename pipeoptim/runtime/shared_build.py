"""Give a stage its own copies of the shared parameters it holds (see
:mod:`pipeoptim.runtime.shared` and :mod:`pipeoptim.compiler.shared`)."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.trace import TracedModel
from pipeoptim.runtime.shared import SharedParams


def shared_names(traced: TracedModel, plan: Plan) -> dict[str, list[int]]:
    """``{qualified parameter name: stages holding a copy}`` of the plan's shared parameters."""
    targets = {n.name: str(n.target) for n in traced.gm.graph.nodes if n.op == "get_attr"}
    return {targets[node]: holders for node, holders in sorted(plan.shared.items())}


def shared_holders(plan: Plan) -> list[int]:
    """The stages holding any shared parameter, sorted (one process group for all of them)."""
    return sorted({k for holders in plan.shared.values() for k in holders})


def copy_shared(module: fx.GraphModule, traced: TracedModel, plan: Plan, stage: int) -> None:
    """Replace, in ``module`` (stage ``stage``'s graph module, whose parameters are the
    traced model's), every shared parameter this stage holds but does not hold first by a copy
    of its own, so that no two stages update the same tensor (in the local executor all stages
    come from one traced model). Where the parameter's module runs whole in this stage (a leaf
    called in several stages: a siamese model's LSTM or attention), the stage gets a copy of
    that module, buffers included: the plan keeps the calls of a module that changes its
    buffers in one stage (:func:`pipeoptim.compiler.grouping.fine_units`), so a copy's buffers
    stay what the model's hold. Before, such a model was refused with a fix that named
    ``leaf_modules`` the user had not given (helper-116).
    """
    for name, holders in shared_names(traced, plan).items():
        if stage not in holders or stage == holders[0]:
            continue
        prefix, _, field = name.rpartition(".")
        owner = module.get_submodule(prefix)
        if owner is traced.gm.get_submodule(prefix):  # a leaf module: this stage's own copy
            parent, _, last = prefix.rpartition(".")
            owner = copy.deepcopy(owner)
            setattr(module.get_submodule(parent), last, owner)
        original = getattr(owner, field)
        setattr(owner, field, nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad))


def stage_shared(
    module: fx.GraphModule,
    traced: TracedModel,
    plan: Plan,
    stage: int,
    asynchronous: bool,
    device: torch.device | str,
) -> SharedParams | None:
    """The :class:`SharedParams` of stage ``stage`` (``None`` if it holds no shared parameter);
    the delay D is ``k_last - k_first`` over the holders for asynchronous methods, else 0."""
    names = shared_names(traced, plan)
    holders = shared_holders(plan)
    if stage not in holders:
        return None
    specs = {}
    for name in names:
        p = traced.gm.get_parameter(name)
        specs[name] = (tuple(p.shape), p.dtype)
    return SharedParams(
        stage=stage,
        names=sorted(names),
        params={n: module.get_parameter(n) for n, h in names.items() if stage in h},
        specs=specs,
        first_holder={n: h[0] for n, h in names.items()},
        holders=holders,
        delay=holders[-1] - holders[0] if asynchronous else 0,
        device=device,
    )
