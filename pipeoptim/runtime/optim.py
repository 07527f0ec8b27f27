"""The user's optimizer, mirrored per stage.

Each stage runs an optimizer of the user's class over its own parameters, with the user's
per-group hyperparameters. Hyperparameters are read from the user's optimizer for every
mini-batch (:func:`hyperparameters`), so a learning-rate scheduler stepping the user's
optimizer drives every stage.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import torch
from torch import nn
from torch.optim import Optimizer

from pipeoptim.errors import PipelineError
from pipeoptim.units import first_few

#: Group keys that are not hyperparameters.
_NOT_HYPER = {"params", "param_names"}


def stage_keywords(optimizer_class: type[Optimizer], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords a stage's ``optimizer_class`` is built with: the user's ``defaults`` that
    its ``__init__`` accepts. The stages step with the kernel the user's optimizer uses
    (``fused``, ``foreach`` or torch's default), never one chosen for the user: torch's fused
    kernels are faster on the CPU (SGD with momentum over 2 M parameters, one thread: 1.25 ms
    against 2.2 ms), but they are not the for-loop's arithmetic. Fused AdamW moved the conv
    biases before BatchNorm of a small CNN (gradients near zero) 7.8e-3 away from the
    for-loop's in 6 steps, and fused SGD fails on a group where some parameters have momentum
    buffers and others not yet (torch 2.13), so the pipeline would no longer equal the user's
    plain training."""
    accepted = inspect.signature(optimizer_class.__init__).parameters
    return {k: v for k, v in defaults.items() if k in accepted and k != "params"}


def check_steppable(optimizer: Optimizer) -> None:
    """Refuse an optimizer the stages cannot step as the user's would be: one whose ``step()``
    needs a closure (``torch.optim.LBFGS``: it evaluates the loss again, several times per step,
    and a pipeline's stages each hold a part of the model and step on the gradients of a
    mini-batch that has already gone through), or one with step hooks
    (:func:`check_no_step_hooks`).

    Raises:
        ValueError: ``step`` has a ``closure`` argument without a default.
        PipelineError: the optimizer has a step hook.
    """
    check_no_step_hooks(optimizer)
    try:
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):  # a builtin without a signature: it takes what it takes
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{type(optimizer).__name__}.step() needs a closure that evaluates the loss again, "
            "which a pipeline cannot give (each stage holds a part of the model and steps once "
            "per mini-batch): use an optimizer that steps on the gradients (SGD, Adam, AdamW, "
            "RMSprop, ...) or train this model without pipeoptim"
        )


def check_no_step_hooks(optimizer: Optimizer) -> None:
    """Refuse step hooks on the user's ``optimizer`` (``register_step_pre_hook``,
    ``register_step_post_hook``): the stages step optimizers of their own (:func:`mirror`), so
    the hooks would never run, and whatever they do to the weights would be missing, silently.

    Raises:
        PipelineError: the optimizer has a step hook.
    """
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        name = type(optimizer).__name__
        raise PipelineError(
            f"the {name} has step hooks (register_step_pre_hook / register_step_post_hook), which a "
            "pipeline cannot run: each stage steps an optimizer of its own over its part of the model. "
            f"Do their work in a subclass's step() over self.param_groups (class Mine({name}): "
            "def step(self, closure=None): loss = super().step(closure); ...; return loss), which "
            "every stage runs, and remove the hooks"
        )


def optimizer_layout(optimizer: Optimizer) -> tuple[tuple[int, int, tuple[bool, ...]], ...]:
    """Each group's parameter list, by identity and length, and which of its parameters require
    a gradient: what the stages' optimizers and modules were built from (``add_param_group``
    adds a group, a new list replaces one, ``append`` lengthens one; a stage's parameter keeps
    the ``requires_grad`` it had at compile: one frozen then never trained after it was
    unfrozen, helper-135), checked at every step."""
    return tuple(
        (id(group["params"]), len(group["params"]), tuple(p.requires_grad for p in group["params"]))
        for group in optimizer.param_groups
    )


def hyperparameters(
    optimizer: Optimizer,
    layout: tuple[tuple[int, int, tuple[bool, ...]], ...] | None = None,
    names: list[list[str]] | None = None,
) -> list[dict[str, Any]]:
    """Per-group hyperparameters of ``optimizer`` as plain values (tensor scalars as floats).

    Args:
        layout: the optimizer's :func:`optimizer_layout` when the stages were built: the
            groups, their parameters and which of them require a gradient are checked to be
            the same, and step hooks to be absent (:func:`check_no_step_hooks`).
        names: the parameter names of each group (for the message).

    Raises:
        PipelineError: with ``layout``, a group was added (``add_param_group``) or removed, a
            group's parameters changed, or a parameter was frozen or unfrozen
            (``requires_grad``): the stages would go on without the change.
    """
    if layout is not None:
        check_no_step_hooks(optimizer)
        now = optimizer_layout(optimizer)
        if now != layout:
            _refuse_changed_groups(now, layout, names)
    out = []
    for group in optimizer.param_groups:
        hyper = {}
        for key, value in group.items():
            if key in _NOT_HYPER:
                continue
            hyper[key] = (
                float(value.item()) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            )
        out.append(hyper)
    return out


def _refuse_changed_groups(
    now: tuple[tuple[int, int, tuple[bool, ...]], ...],
    layout: tuple[tuple[int, int, tuple[bool, ...]], ...],
    names: list[list[str]] | None,
) -> NoReturn:
    """Raise the :class:`PipelineError` of :func:`hyperparameters` for groups ``now`` that are
    not ``layout``, the groups at compile."""
    changed = next((i for i, (a, b) in enumerate(zip(now, layout)) if a != b), 0)
    if len(now) != len(layout):
        what = f"{len(layout)} groups at compile, {len(now)} now (add_param_group)"
    elif now[changed][:2] != layout[changed][:2]:
        what = f"the parameters of group {changed} changed"
    else:
        flags = zip(now[changed][2], layout[changed][2])
        moved = [j for j, (a, b) in enumerate(flags) if a != b]
        who = [names[changed][j] for j in moved] if names else [f"parameter {j}" for j in moved]
        frozen = "unfrozen" if now[changed][2][moved[0]] else "frozen"
        what = f"requires_grad of {first_few(who)} in group {changed} changed: {frozen}"
        raise PipelineError(
            f"a parameter was frozen or unfrozen after compile ({what}): the stages took which "
            "parameters train at compile and would go on without the change. Set requires_grad "
            "before compile; to change it mid-run, compile again from pipe.to_module() with the "
            "change and continue its optimizer with "
            "new_pipe.load_optimizer_state_dict(pipe.optimizer_state_dict())"
        )
    raise PipelineError(
        f"the optimizer's parameter groups changed after compile ({what}): the stages "
        "built their optimizers from the groups at compile and would train without the "
        "change. Give the optimizer every group before compile, or compile again from "
        "pipe.to_module() with an optimizer holding the groups (new ones after the old) and "
        "continue it with new_pipe.load_optimizer_state_dict(pipe.optimizer_state_dict())"
    )


def restore_hyperparameters(optimizer: Optimizer, saved: Sequence[Mapping[str, Any]] | None) -> None:
    """Set ``optimizer``'s group hyperparameters to ``saved`` (:func:`hyperparameters` output),
    as ``Optimizer.load_state_dict`` does: resuming with a fresh optimizer and
    ``scheduler.load_state_dict`` left StepLR's lr at its start (the stages take the lr from this
    optimizer at every step). ``None`` (a state saved before they were kept) changes nothing.
    The groups were checked to be ``optimizer``'s before anything was loaded
    (:func:`pipeoptim.checkpoint.optimizer_misfit`).
    """
    if saved is None:
        return
    apply_hyperparameters(optimizer, range(len(saved)), saved)


def param_group_names(optimizer: Optimizer, model: nn.Module) -> list[list[str]]:
    """Qualified names of the parameters of each group of ``optimizer`` (from ``model``).

    Raises:
        ValueError: the optimizer holds a tensor that is not a parameter of the model.
    """
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError(
                f"optimizer group {i} holds {len(missing)} tensor(s) that are not parameters of "
                f"{type(model).__name__}: build the optimizer from model.parameters()"
            )
        groups.append([names[id(p)] for p in group["params"]])
    return groups


def constructor_arguments(optimizer: Optimizer) -> dict[str, Any]:
    """The keywords that rebuild ``optimizer``'s class for a stage: ``optimizer.defaults``, and
    the optimizer's own attributes named like an argument of its ``__init__`` (a subclass's
    ``self.clip = clip`` is not in ``defaults``: the stages rebuilt it with ``clip``'s default,
    or failed where it had none).

    Raises:
        ValueError: ``__init__`` requires an argument found in neither.
    """
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    own = {
        name: value
        for name, value in vars(optimizer).items()
        if name in accepted and name not in ("self", "params") and not name.startswith("_")
    }
    arguments = {**own, **optimizer.defaults}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = [
        name
        for name, p in accepted.items()
        if name not in ("self", "params")
        and p.kind in named
        and p.default is p.empty
        and name not in arguments
    ]
    if missing:
        names = ", ".join(repr(n) for n in missing)
        raise ValueError(
            f"each stage builds a {cls.__name__} of its own from optimizer.defaults and the optimizer's "
            f"attributes named like {cls.__name__}.__init__'s arguments, but {names} is in neither: "
            f"keep it in defaults (super().__init__(params, dict(lr=lr, {missing[0]}={missing[0]}))) "
            f"or as self.{missing[0]}"
        )
    return arguments


def mirror(
    optimizer_class: type[Optimizer],
    defaults: Mapping[str, Any],
    groups: Sequence[Sequence[str]],
    hyper: Sequence[Mapping[str, Any]],
    params: Mapping[str, nn.Parameter],
    aliases: Mapping[str, str] = {},
) -> tuple[Optimizer | None, list[int]]:
    """An ``optimizer_class`` over the parameters of one stage (:func:`stage_keywords`).

    Args:
        optimizer_class: the user's optimizer class.
        defaults: the user's ``optimizer.defaults`` (constructor keywords).
        groups: parameter names of each user group (:func:`param_group_names`).
        hyper: hyperparameters of each user group (:func:`hyperparameters`).
        params: the stage's trainable parameters by name.
        aliases: other names of shared parameters, ``{alias: name in params}``.

    Returns:
        The optimizer (``None`` if the stage has no trainable parameters) and, for each of its
        groups, the index of the user group it mirrors.
    """
    stage_groups, group_map = [], []
    seen: set[int] = set()
    for index, names in enumerate(groups):
        chosen = []
        for name in names:
            p = params.get(name, params.get(aliases.get(name, ""), None))
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                chosen.append(p)
        if chosen:
            stage_groups.append({"params": chosen, **hyper[index]})
            group_map.append(index)
    if not stage_groups:
        return None, []
    return optimizer_class(stage_groups, **stage_keywords(optimizer_class, defaults)), group_map


def apply_hyperparameters(
    optimizer: Optimizer, group_map: Sequence[int], hyper: Sequence[Mapping[str, Any]]
) -> None:
    """Set the stage optimizer's groups to the user's hyperparameters ``hyper``."""
    for group, index in zip(optimizer.param_groups, group_map):
        for key, value in hyper[index].items():
            if isinstance(group.get(key), torch.Tensor):
                group[key].fill_(value)
            else:
                group[key] = value
