"""Everything needed to build the stages of a pipeline, in any process.

A :class:`PipelineSpec` is plain, picklable data (the model, one example micro-batch, the
plan, the method and the user's optimizer class and hyperparameters). Every process that runs
a stage -- this one for the local executor, each worker otherwise -- traces the model again
(deterministic; the graph hash is checked against the plan) and builds its stage with
:func:`build_stage`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pipeoptim.batchnorm import commit_batch_norm, has_deferred
from pipeoptim.compiler.codegen import stage_module
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.trace import TracedModel, trace
from pipeoptim.errors import PlanError
from pipeoptim.loss_check import CheckedLoss
from pipeoptim.methods import get_method
from pipeoptim.microbatch import Reduction
from pipeoptim.runtime.async_norms import AsyncNorms
from pipeoptim.runtime.compiled import compile_stage
from pipeoptim.runtime.optim import mirror
from pipeoptim.runtime.policies import make_policy
from pipeoptim.runtime.precision import under_autocast
from pipeoptim.runtime.scaler import LossScaler
from pipeoptim.runtime.schedule import Schedule, schedule_for
from pipeoptim.runtime.shared_build import copy_shared, stage_shared
from pipeoptim.runtime.stage import StageRuntime


@dataclass
class PipelineSpec:
    """What every stage process needs (picklable)."""

    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    leaf_modules: tuple[str, ...]
    plan: Plan
    method: str
    optimizer_class: type[torch.optim.Optimizer]
    optimizer_defaults: dict[str, Any]
    group_names: list[list[str]]
    hyper: list[dict[str, Any]]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    micro_batches: int
    loss_reduction: Reduction = "mean"
    #: the example's sequence length (dim 1) where shorter ones may be given, else ``None``
    length: int | None = None
    seed: int = 0
    policy_options: dict[str, Any] = field(default_factory=dict)
    nan_check: str = "stages"
    max_grad_norm: float | None = None
    autocast: torch.dtype | None = None
    #: ``torch.compile`` backend of the stages (:mod:`pipeoptim.runtime.compiled`), or ``None``
    compile_stages: str | None = None
    prediction_error_every: int = 64
    #: R, replicas of the pipeline (data parallelism, :mod:`pipeoptim.runtime.replicas`)
    data_parallel: int = 1

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    @property
    def world_size(self) -> int:
        """Ranks of the layout: N stages × R replicas."""
        return self.plan.num_stages * self.data_parallel

    def schedule(self, stage: int) -> Schedule:
        """The schedule of the method at ``stage`` (PipeDream-2BW steps every M micro-batches)."""
        method = get_method(self.method)
        steps_every = self.micro_batches if method.policy == "2bw" else 1
        return schedule_for(stage, method.schedule, self.num_stages, self.micro_batches, steps_every)

    def trace(self) -> TracedModel:
        """The model traced again, where a stage is built (a worker process, a replica); its
        warnings (modules made leaves, hooks that will not run) were given once, at compile."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return trace(self.model, self.example_inputs, self.leaf_modules)


def input_grad_mask(plan: Plan, stage: int) -> list[bool]:
    """For each flat input leaf of ``stage``, whether a gradient is sent back for it."""
    if stage == 0:
        return []
    mask = []
    for name in plan.io[stage].inputs:
        for meta in plan.values[name]["meta"]:
            floating = meta.get("dtype", "").startswith(("float", "bfloat", "complex"))
            mask.append(meta["kind"] == "tensor" and bool(meta.get("requires_grad")) and floating)
    return mask


def aliases_of(tied: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every name of a shared parameter mapped to its other names."""
    out: dict[str, list[str]] = {}
    for first, others in tied.items():
        names = [first, *others]
        for name in names:
            out[name] = [n for n in names if n != name]
    return out


def build_stage(
    spec: PipelineSpec, traced: TracedModel, stage: int, device: torch.device | str = "cpu"
) -> StageRuntime:
    """The runtime of stage ``stage``: submodule with its weight policy, optimizer, loss."""
    plan = spec.plan
    module = stage_module(traced, plan, stage)
    method = get_method(spec.method)
    copy_shared(module, traced, plan, stage)
    policy = make_policy(method.policy, **spec.policy_options) if method.asynchronous else None
    params = stage_params(module)
    module.to(device)  # each module keeps the train/eval mode the user's model had (a frozen BatchNorm)
    loss_fn = _stage_loss(spec)
    checked = loss_fn if isinstance(loss_fn, CheckedLoss) else None
    if spec.compile_stages is not None:
        compile_stage(module, spec.compile_stages)
    if spec.autocast is not None:
        module.forward = under_autocast(module.forward, spec.autocast, device)  # type: ignore[method-assign]
        loss_fn = under_autocast(loss_fn, spec.autocast, device)
    optimizer, group_map = mirror(
        spec.optimizer_class,
        spec.optimizer_defaults,
        spec.group_names,
        spec.hyper,
        params,
        _alias_lookup(aliases_of(traced.tied), params),
    )
    if policy is not None and optimizer is not None:
        policy.attach(params, optimizer, stage, plan.num_stages)
    if has_deferred(module):  # running statistics of the mini-batch, once it has been stepped
        if optimizer is None:
            raise PlanError(
                f"stage {stage} holds a deferred BatchNorm but no trainable parameter, so it never "
                "steps and could not update its running statistics: use batch_norm='micro-batch'"
            )
        optimizer.register_step_post_hook(lambda *_: commit_batch_norm(module))
    last = stage == plan.num_stages - 1
    runtime = StageRuntime(
        index=stage,
        num_stages=plan.num_stages,
        module=module,
        optimizer=optimizer,
        group_map=group_map,
        policy=policy if optimizer is not None else None,
        input_grad_mask=input_grad_mask(plan, stage),
        loss_fn=loss_fn if last else None,
        unflatten_output=traced.unflatten_output if last else None,
        seed=spec.seed,
        nan_check=spec.nan_check,
        max_grad_norm=spec.max_grad_norm,
        scaler=LossScaler() if spec.autocast is torch.float16 else None,
        prediction_error_every=spec.prediction_error_every,
    )
    if last and checked is not None:
        runtime.loss_check = checked
        checked.who = f"stage {stage}'s loss check"
    runtime.shared = stage_shared(module, traced, plan, stage, method.asynchronous, device)
    if method.asynchronous and (spec.max_grad_norm is not None or spec.autocast is torch.float16):
        if runtime.shared is not None:
            raise PlanError(
                f"stage {stage} shares weights with another stage: max_grad_norm and float16 with an "
                "asynchronous method do not support weights shared between stages yet; use "
                "method='gpipe' or '1f1b', or a plan that keeps the shared weights in one stage"
            )
        runtime.async_norms = AsyncNorms(stage, plan.num_stages, spec.micro_batches)
    return runtime


def _stage_loss(spec: PipelineSpec) -> Callable[[Any, Any], torch.Tensor]:
    """The last stage's loss; checked against ``loss_reduction`` where mini-batches are split
    (into micro-batches, or into the replicas' shares)."""
    if spec.micro_batches == 1 and spec.data_parallel == 1:
        return spec.loss_fn
    return CheckedLoss(spec.loss_fn, spec.loss_reduction)  # checked off the critical path


def _alias_lookup(aliases: dict[str, list[str]], params: dict[str, nn.Parameter]) -> dict[str, str]:
    """``{name in the optimizer: name in params}`` for shared parameters named otherwise."""
    out = {}
    for name, others in aliases.items():
        for other in others:
            if other in params:
                out[name] = other
    return out


def stage_params(gm: fx.GraphModule) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``gm`` its optimizer steps and its weight policy handles,
    by the names used in the graph: those read by a ``get_attr``."""
    by_name = dict(gm.named_parameters(remove_duplicate=False))
    return {
        str(n.target): by_name[str(n.target)]
        for n in gm.graph.nodes
        if n.op == "get_attr" and str(n.target) in by_name and by_name[str(n.target)].requires_grad
    }
