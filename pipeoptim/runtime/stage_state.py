"""A stage's weights and optimizer state by parameter name: saved, merged over the stages
into one state for the whole pipeline, and restored (checkpoints, ``state_dict``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from pipeoptim.runtime.scaler import LossScaler
from pipeoptim.runtime.stage import StageRuntime


def stage_state(stages: Sequence[StageRuntime]) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``stages`` by qualified name, non-persistent buffers too (a
    leaf module's are its own, out of the stage's ``state_dict()``: ``to_module`` returned their
    first values, helper-158; the model's ``state_dict()`` and checkpoints leave them out)."""
    state: dict[str, torch.Tensor] = {}
    for stage in stages:
        state.update(stage.module.state_dict())
        for name, buffer in stage.module.named_buffers(remove_duplicate=False):
            state.setdefault(name, buffer.detach())
    return state


def load_stage_state(
    stage: StageRuntime, state: dict[str, torch.Tensor], aliases: dict[str, list[str]]
) -> None:
    """Copy the entries of ``state`` that ``stage`` owns into its tensors (in place)."""
    if stage.policy is not None:
        stage.policy.weights_loaded()
    with torch.no_grad():
        for name, tensor in stage.module.state_dict(keep_vars=True).items():
            source = state.get(name)
            if source is None:
                source = next((state[a] for a in aliases.get(name, []) if a in state), None)
            if source is not None:
                tensor.copy_(source)


def optimizer_state(stage: StageRuntime) -> dict[str, Any]:
    """The stage optimizer's state and last gradients keyed by parameter name, its step count.

    The last gradients are part of it because predictors read them (SGD, RMSprop, Adagrad):
    a resumed run predicts exactly as an uninterrupted one; so is the weight version its
    policy runs the next mini-batch on besides W (``shadow``: 2BW's ``W(t−1)``).
    """
    result: dict[str, Any] = {"state": {}, "grads": {}, "steps": {stage.index: stage.steps}}
    if stage.scaler is not None:  # float16 loss scaling: stage 0's copy is the one kept
        result["loss_scale"] = asdict(stage.scaler)
    norms = stage.async_norms
    if norms is not None and stage.index == 0 and norms.known is not None:
        # the parts stage 0 sends forward (asynchronous clipping), so a resumed run clips as one
        # that flushed there
        result["norm_parts"] = {"mini_batch": norms.known[0], "parts": norms.known[1].tolist()}
    versions = stage.policy.saved_versions() if stage.policy is not None else {}
    if versions:  # 2BW's shadow, which the next mini-batch runs on
        result["shadow"] = versions
    if stage.optimizer is None:
        return result
    return result | _by_name(stage.optimizer, stage.module.named_parameters(remove_duplicate=False))


def _by_name(optimizer: Optimizer, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """``optimizer``'s state and the last gradients of its parameters, as CPU copies keyed by
    each name ``named`` gives them (a shared parameter under each of its names)."""
    held = {id(p) for p in _all_params(optimizer)}
    state: dict[str, Any] = {}
    grads: dict[str, torch.Tensor] = {}
    for name, p in named:
        if id(p) not in held:
            continue
        if optimizer.state.get(p):
            state[name] = {
                k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                for k, v in optimizer.state[p].items()
            }
        if p.grad is not None:
            grads[name] = p.grad.detach().cpu().clone()
    return {"state": state, "grads": grads}


def held_state(model: nn.Module, optimizer: Optimizer) -> dict[str, Any] | None:
    """What ``optimizer`` already holds for ``model``'s parameters -- its per-parameter state
    (SGD's momentum buffers, Adam's moments and step count, ...) and their last gradients --
    keyed as the stages' optimizer state is (:func:`optimizer_state`); ``None`` where it holds
    no state (it has not stepped). A model trained for a while before it is compiled then
    continues as it would with ``optimizer``: the stages' optimizers started empty before
    (momentum and Adam's moments restarted, its step count at 0)."""
    if not any(optimizer.state.get(p) for p in _all_params(optimizer)):
        return None
    return {**_by_name(optimizer, model.named_parameters(remove_duplicate=False)), "steps": {}}


def _all_params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def merge_optimizer_states(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state for the whole pipeline from the per-stage ones."""
    merged: dict[str, Any] = {"state": {}, "grads": {}, "steps": {}}
    for part in parts:
        merged["state"].update(part["state"])
        merged["grads"].update(part.get("grads", {}))
        merged["steps"].update({int(k): v for k, v in part["steps"].items()})
        if "shadow" in part:
            merged.setdefault("shadow", {}).update(part["shadow"])
        for key in ("loss_scale", "norm_parts"):  # stage 0's (asynchronous methods: its S rules)
            if key in part and key not in merged:
                merged[key] = part[key]
    return merged


@torch.inference_mode(False)  # its copies under a caller's inference mode: no later step could update them
def load_optimizer_state(stage: StageRuntime, state: dict[str, Any]) -> None:
    """Restore the part of ``state`` (:func:`merge_optimizer_states`) that ``stage`` owns."""
    steps = state["steps"]
    own = steps.get(stage.index, steps.get(str(stage.index)))
    if own is None:  # saved with fewer stages: after a flush every stage has taken as many steps
        own = max((int(v) for v in steps.values()), default=0)
    stage.steps = int(own)
    if stage.policy is not None:
        stage.policy.reset()
        stage.policy.restore_versions(state.get("shadow", {}), int(state.get("mini_batches", 0)))
    # what the state does not hold starts afresh, as in torch's load_state_dict: a pipeline that
    # trained before the load kept its momentum buffers, moments and loss scale (helper-135)
    if stage.scaler is not None:
        stage.scaler = LossScaler(**state.get("loss_scale", {}))
    saved = state.get("norm_parts")  # stage 0's; parts of another layout do not apply
    norms = stage.async_norms  # the later stages learn stage 0's from its next forward
    if norms is not None:
        fits = saved is not None and stage.index == 0 and len(saved["parts"]) == stage.num_stages
        norms.known = (
            (int(saved["mini_batch"]), torch.tensor(saved["parts"], dtype=torch.float64)) if fits else None
        )
    if stage.optimizer is None:
        return
    stage.optimizer.state.clear()
    for name, p in stage.module.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        saved = state["state"].get(name)
        if saved is not None:  # copies: the optimizer updates them in place, and the holders of a
            # shared parameter in one process (the local executor) must not share one buffer
            stage.optimizer.state[p] = {
                k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in saved.items()
            }
        grad = state.get("grads", {}).get(name)
        p.grad = None if grad is None else grad.to(p.device, copy=True)
    stage._grads_stale = True  # the next backward starts a new gradient
