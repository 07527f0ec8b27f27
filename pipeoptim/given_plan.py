"""A plan handed to :func:`pipeoptim.compile` (``plan=``), checked against the model and the
request before any stage is built."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from pipeoptim.compiler.codegen import stage_modules
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.profile_key import MEASURES, precision_differs
from pipeoptim.compiler.trace import TracedModel
from pipeoptim.errors import CodegenError, PlanError


def given_plan(
    plan: Plan | str | os.PathLike[str],
    traced: TracedModel,
    config: CostConfig,
    log: Callable[[str], None],
    inputs: Sequence[torch.Tensor],
    autocast: torch.dtype | None,
) -> Plan:
    """Check a plan handed to :func:`compile` against the model and the request.

    Raises:
        PlanError: unreadable, made from a profile that did not record in-place changes,
            or for another graph, input dtype, autocast setting, stage count, method or
            micro-batch count.
    """
    chosen = plan if isinstance(plan, Plan) else Plan.load(plan)
    if chosen.profile_key.get("graph_hash") != traced.graph_hash:
        raise PlanError(
            f"the plan was made for another model graph ({chosen.model}); make it for this model "
            "(pipeoptim partition ... --save) or leave plan unset"
        )
    if chosen.profile_key.get("measures", MEASURES) < 5:  # older profiles: no in-place changes recorded
        raise PlanError(
            f"the plan was made from a profile of version {chosen.profile_key['measures']}, which did "
            "not record the model's in-place changes, so it may cut between a tensor and its change "
            "(a buffer's update lost): make a new plan (pipeoptim partition ... --save) or leave plan unset"
        )
    differs = precision_differs(chosen.profile_key, inputs, autocast)
    if differs is not None:  # the stages would exchange values of other dtypes than the plan's
        raise PlanError(
            f"{differs}; leave plan unset, or give one saved (pipe.plan.save) from such a pipeline"
        )
    for what, have, want in (
        ("stages", chosen.config.num_stages, config.num_stages),
        ("method", chosen.config.method, config.method),
        ("micro-batches", chosen.config.micro_batches, config.micro_batches),
        ("data-parallel", chosen.config.data_parallel, config.data_parallel),
    ):
        if have != want:
            raise PlanError(
                f"the plan is for {what}={have!r}, this pipeline has {what}={want!r}; make a new plan"
            )
    try:
        stage_modules(traced, chosen)  # what the stages will build: a plan that does not fit fails here
    except CodegenError as exc:
        raise PlanError(str(exc)) from exc
    key = chosen.profile_key
    log(f"using the given plan of {chosen.model} (profiled on {key.get('device')}, torch {key.get('torch')})")
    return chosen
