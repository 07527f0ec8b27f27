"""A plan handed to :func:`pipeoptim.compile` (``plan=``), checked against the model and the
request before any stage is built."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from pipeoptim.checkpoint import read_checkpoint, written_by_torch_save
from pipeoptim.compiler.codegen import stage_modules
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.profile_key import MEASURES, precision_differs
from pipeoptim.compiler.trace import TracedModel
from pipeoptim.errors import CheckpointError, CodegenError, PlanError


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
            micro-batch count; under a memory limit, one whose figures do not bound it
            (:func:`_check_setting`).
    """
    chosen = plan if isinstance(plan, Plan) else read_plan(plan)
    if "layouts" in chosen.summary:  # the search that chose it is its maker's, not this run's
        chosen = replace(chosen, summary={k: v for k, v in chosen.summary.items() if k != "layouts"})
    if chosen.profile_key.get("graph_hash") != traced.graph_hash:
        raise PlanError(
            f"the plan was made for another model graph ({chosen.model}, graph "
            f"{str(chosen.profile_key.get('graph_hash'))[:12]}; this model's: {traced.graph_hash[:12]}: "
            "other layers, sizes or code); make it for this model (a run folder's plan.json, "
            "pipeoptim partition ... --save) or leave plan (--plan) unset"
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
                f"the plan is for {what}={have!r}, this pipeline has {what}={want!r}: give a plan made "
                f"for {what}={want!r}, or this pipeline the plan's (--{what.replace('_', '-')})"
            )
    _check_setting(chosen, config, int(inputs[0].shape[0]) if inputs else chosen.batch_size, log)
    try:
        stage_modules(traced, chosen)  # what the stages will build: a plan that does not fit fails here
    except CodegenError as exc:
        raise PlanError(str(exc)) from exc
    key = chosen.profile_key
    log(f"using the given plan of {chosen.model} (profiled on {key.get('device')}, torch {key.get('torch')})")
    return chosen


def read_plan(path: str | os.PathLike[str]) -> Plan:
    """The plan in a plan file, or in a checkpoint (:meth:`Pipeline.save_checkpoint` keeps its
    plan: ``plan=checkpoint`` repeats a run's cut, as ``pipeoptim train --resume`` does; "not a
    plan file" before, helper-161).

    Raises:
        PlanError: unreadable, or a checkpoint without a plan (sequential training's).
    """
    try:
        binary = written_by_torch_save(path)
    except OSError:
        binary = False  # Plan.load names the problem
    if not binary:
        return Plan.load(path)
    try:
        saved = read_checkpoint(path)["plan"]
    except CheckpointError as exc:
        raise PlanError(str(exc)) from exc
    if saved is None:
        raise PlanError(
            f"the checkpoint {path} holds no plan (a sequential run's): give a plan or leave plan unset"
        )
    return Plan.from_dict(saved, f"the plan in {path}")


def _check_setting(chosen: Plan, config: CostConfig, rows: int, log: Callable[[str], None]) -> None:
    """Say where the plan's figures were made for another micro-batch size, optimizer state or
    link (:func:`_link_differences`) than this pipeline's (they stay those of its own
    setting), and refuse it under a memory
    limit its figures do not bound: made without one or with a larger one, for fewer rows or
    less optimizer state, or holding more. Before, a plan made without a limit was taken under
    ``memory=`` that a fresh plan found infeasible, and one made for 16 rows ran 512 with its
    16-row memory (helper-115).

    Raises:
        PlanError: ``config.memory_limit`` is set and the plan's figures do not bound it.
    """
    made = chosen.config
    other = []
    if chosen.batch_size != rows:
        other.append(f"micro-batches of {chosen.batch_size} rows (this pipeline: {rows})")
    if made.opt_state_factor != config.opt_state_factor:
        other.append(
            f"{made.opt_state_factor:g} bytes of optimizer state per parameter byte (this optimizer: "
            f"{config.opt_state_factor:g})"
        )
    held = list(other)  # what sets the memory a stage holds (the link figures do not)
    other += _link_differences(made, config)
    if other:
        said = " and ".join(other)
        log(f"the given plan was made for {said}: its predicted time and memory are of that setting")
    limit = config.memory_limit
    if limit is None:
        return
    peak = max(stage.memory_bytes for stage in chosen.stages)
    if (
        made.memory_limit is None
        or made.memory_limit > limit
        or chosen.batch_size < rows
        or made.opt_state_factor < config.opt_state_factor
        or peak > limit
    ):
        planned = (
            "without a memory limit" if made.memory_limit is None else f"under {made.memory_limit:,} bytes"
        )
        raise PlanError(
            f"memory={limit:,} bytes per stage, but the plan was made {planned}"
            + (f" for {' and '.join(held)}" if held else "")
            + f" (its largest stage holds {peak:,} bytes): make a plan under this limit "
            "(pipeoptim partition ... --memory ... --save), or leave plan unset"
        )


#: the link figures a plan is priced with as given to ``compile``: (field, what it is, unit)
_LINK = (
    ("bandwidth", "bandwidth", "bytes/s"),
    ("latency_s", "latency", "s per message"),
    ("action_overhead_s", "action overhead", "s"),
    ("allreduce_bandwidth", "all-reduce bandwidth", "bytes/s"),
    ("allreduce_latency_s", "all-reduce latency", "s"),
)


def _link_differences(made: CostConfig, config: CostConfig) -> list[str]:
    """The link figures (:data:`_LINK`; the all-reduce's only with replicas) the plan was
    priced with where this pipeline was given others: its stage times and all-reduce times
    stay the plan's (before, a plan priced with a free all-reduce kept it silently)."""
    said = []
    for field, what, unit in _LINK:
        if field.startswith("allreduce") and config.data_parallel == 1:
            continue
        have, want = _resolved(made, field), _resolved(config, field)
        if have != want:
            said.append(f"{what} {_figure(have, unit)} (this pipeline: {_figure(want, unit)})")
    return said


def _resolved(config: CostConfig, field: str) -> float | None:
    """``config``'s ``field``, the all-reduce's ``None`` read as the link's figure it means (a
    plan made with the default, given the link's figures explicitly, was said to differ)."""
    value = getattr(config, field)
    if value is None and field.startswith("allreduce"):
        return config.bandwidth if field == "allreduce_bandwidth" else config.latency_s
    return value


def _figure(value: float | None, unit: str) -> str:
    return "none" if value is None else f"{value:g} {unit}"
