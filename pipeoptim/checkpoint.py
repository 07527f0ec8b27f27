"""Checkpoints: weights in the original model's keys, optimizer state, position, plan.

One file, written atomically (a crash leaves the previous checkpoint whole), loaded with
checks that it belongs to this model. A checkpoint holds only tensors and plain data (dicts,
lists, numbers, strings) and is read with ``torch.load(..., weights_only=True)``: loading a
crafted file runs none of its code.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.torch_version import TorchVersion

from pipeoptim.errors import CheckpointError
from pipeoptim.fileio import atomic_write, wrong_fields
from pipeoptim.units import first_few

FORMAT = "pipeoptim-checkpoint/1"
# what checkpoints written before 2026-12-05 hold besides tensors and plain data: the torch
# version in the plan's profile key (a TorchVersion; a str since)
_SAFE = [TorchVersion]


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint holding ``state`` to ``path`` atomically.

    ``state`` holds ``model_class`` (the model's qualified class name), ``method``,
    ``state_dict`` (original model keys), ``optimizer``, ``mini_batches`` (how many were
    trained), ``plan`` (the plan as data, or ``None``) and ``extra`` (tensors and plain data the
    caller wants back, e.g. an LR scheduler's state); the file adds ``format``.

    Raises:
        CheckpointError: ``extra`` holds what :func:`read_checkpoint` would refuse (a numpy
            number, an object); nothing is written, so the previous checkpoint stays.
    """
    if state.get("extra"):
        _check_loadable(state["extra"])
    data = {"format": FORMAT, **state}
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _check_loadable(extra: Any) -> None:
    """Raise CheckpointError where ``extra`` would not load back with ``weights_only=True``
    (a checkpoint that never loads replaced a good one)."""
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    buffer.seek(0)
    try:
        with torch.serialization.safe_globals(_SAFE):
            torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"extra holds objects a checkpoint cannot load back ({_unsupported(exc)}): keep it to "
            "tensors and plain data (dicts, lists, numbers, strings), e.g. float(x) for a numpy "
            "number; nothing was written"
        ) from exc


def _unsupported(exc: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that names the refused global."""
    return next((line for line in str(exc).splitlines() if "Unsupported" in line), "").strip()[:160]


#: what every checkpoint holds beside its format tag (:meth:`pipeoptim.Pipeline.save_checkpoint`)
_FIELDS = {"model_class": str, "method": str, "state_dict": dict, "optimizer": dict, "mini_batches": int}
_FIELDS |= {"plan": (dict, type(None)), "extra": dict}  # no plan: sequential training


#: the fix :func:`read_checkpoint` names where the file is missing
MISSING = "give the path of a file save_checkpoint wrote"


def written_by_torch_save(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` starts as ``torch.save`` writes: a zip archive or a pickle.

    Raises:
        OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def read_checkpoint(path: str | os.PathLike[str], missing: str = MISSING) -> dict[str, Any]:
    """Read a checkpoint file without applying it.

    Args:
        missing: what to do where the file is missing (the command line names ``--resume``).

    Raises:
        CheckpointError: the file is missing, truncated or not a pipeoptim checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: {missing}")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: {missing}")
    if not written_by_torch_save(path):
        raise CheckpointError(f"{path} is not a checkpoint (not a file torch.save wrote): {missing}")
    try:
        with torch.serialization.safe_globals(_SAFE):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a {FORMAT} checkpoint: it holds objects other than tensors and plain "
            f"data ({_unsupported(exc)}); nothing in it was run. Use a checkpoint written by pipeoptim"
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {exc}); delete it or load an older one"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        plain = isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values())
        hint = (
            ": it holds a plain state dict; load it with pipe.load_state_dict(torch.load(path))"
            if plain
            else ""
        )
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint{hint}")
    wrong = wrong_fields(data, _FIELDS)
    if wrong:  # the format tag alone passed, and a missing field raised a KeyError later
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(wrong)} (or holds another type there): it was not "
            "written by pipeoptim's save_checkpoint; load a checkpoint it wrote"
        )
    return data


def misfits(state: dict[str, Any], model: torch.nn.Module) -> str | None:
    """What keeps ``state`` from loading into ``model``: keys missing or unexpected, tensors of
    another shape (the first three of each, e.g. ``"shapes differ: l1.weight [4, 8] (the
    model's [1, 8])"``); ``None`` where it fits. Checked before anything is copied: a stage's
    ``copy_`` broadcasts a tensor of another shape where it can."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [
        f"{name} {list(state[name].shape)} (the model's {list(mine.shape)})"
        for name, mine in expected.items()
        if isinstance(mine, torch.Tensor)
        and isinstance(state.get(name), torch.Tensor)
        and state[name].shape != mine.shape
    ]
    parts = [f"missing {missing[:3]}"] if missing else []
    parts += [f"unexpected {extra[:3]}"] if extra else []
    parts += [f"shapes differ: {', '.join(shapes[:3])}"] if shapes else []
    return "; ".join(parts) or None


#: the format tag of :meth:`pipeoptim.pipeline.Pipeline.optimizer_state_dict`
OPTIMIZER_FORMAT = "pipeoptim-optimizer/1"


def same_tensor_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every name of ``model.state_dict()`` whose tensor also has other names (a tied weight,
    a module registered twice: its parameters and buffers alike) mapped to those names."""
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    return {n: [m for m in group if m != n] for group in names.values() if len(group) > 1 for n in group}


def tied_as_torch_loads(state: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``state`` with every name of a tensor ``model`` holds under several names
    (:func:`same_tensor_names`) holding the value ``model.load_state_dict(state)`` leaves in
    it: the one under the name that comes last in ``model.state_dict()``, each name copied
    into the one tensor in turn."""
    order = {key: i for i, key in enumerate(model.state_dict())}
    state = dict(state)
    for name, others in same_tensor_names(model).items():
        names = [name, *others]
        last = max((n for n in names if n in state), key=order.__getitem__, default=None)
        if last is not None:
            state.update(dict.fromkeys(names, state[last]))
    return state


def optimizer_misfit(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    group_names: list[list[str]],
) -> str | None:
    """Why optimizer ``state`` (:meth:`pipeoptim.pipeline.Pipeline.optimizer_state_dict`) cannot
    continue ``optimizer`` on ``model``, whose groups hold the parameters ``group_names``: saved
    from another optimizer class (Adam's moments would stand in for SGD's momentum buffers, and
    Adam's betas join SGD's groups), for parameters ``model`` does not have, or with other
    parameter groups (their hyperparameters are restored group by group: groups listed in
    another order swapped their learning rates; torch's ``load_state_dict`` refuses groups of
    other sizes); ``None`` where it fits. State without a class (the optimizer's own, handed
    over at ``compile``) is checked by its names only; state in another format (a sequential
    run's is torch's own ``Optimizer.state_dict()``) is named as such."""
    if state.get("format") != OPTIMIZER_FORMAT:
        return (
            "holds optimizer state a pipeline does not read (a sequential run's is torch's own): "
            "continue it with that method, or load its weights alone (load_state_dict)"
        )
    saved, mine = state.get("optimizer"), type(optimizer).__qualname__
    if saved is not None and saved != mine:
        return (
            f"holds the state of {saved}, and this pipeline steps with {mine}: compile it with "
            f"{saved}, or load the weights alone (load_state_dict)"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    tensor = {name: id(p) for name, p in params.items()}
    held = set(state.get("state", {})) | set(state.get("grads", {})) | set(state.get("shadow", {}))
    unknown = sorted(held - set(tensor))
    if unknown:
        return (
            f"holds optimizer state for parameters {type(model).__name__} does not have ({unknown[:3]}): "
            "it was saved from another model; load the state of this one"
        )
    odd = [n for n, v in state.get("shadow", {}).items() if tuple(v.shape) != tuple(params[n].shape)]
    if odd:  # 2BW's previous weights (the next mini-batch's forward would fail on them)
        return f"holds 2BW's previous weights of other shapes than {type(model).__name__}'s: {first_few(odd)}"
    names = state.get("param_group_names")
    grouped = {tensor[n] for group in names or [] for n in group if n in tensor}
    strays = sorted(n for n in held if tensor[n] not in grouped) if names is not None else []
    if strays:  # a group added after the saved ones took their state over (helper-162)
        return (
            f"holds state for parameters outside its groups ({first_few(strays)}): load one pipeoptim saved"
        )
    return _groups_misfit(state, group_names)


def _groups_misfit(state: dict[str, Any], group_names: list[list[str]]) -> str | None:
    """Why the parameter groups ``state`` was saved with are not ``group_names`` (by count, and
    where it names them, a state saved since 2026-12-06, by their parameters), or ``None``.
    Groups after the saved ones (``add_param_group`` before compiling again, as the refusal of
    a group added mid-run says to; refused here before, helper-161) start without state and
    keep their own hyperparameters, as torch's ``add_param_group`` does."""
    saved = state.get("param_groups")
    names = state.get("param_group_names")
    added = saved is not None and names is not None and len(saved) == len(names) < len(group_names)
    if saved is not None and names is None and len(saved) < len(group_names):
        return (
            f"was saved with {len(saved)} parameter groups and without their parameters' names (a "
            f"state saved before 2026-12-06), so the groups this optimizer has after them cannot "
            "be told apart: load it into an optimizer of the saved groups, save it again, then add"
        )
    if saved is not None and len(saved) != len(group_names) and not added:
        return (
            f"was saved with {len(saved)} parameter groups, and this optimizer has "
            f"{len(group_names)}: build the optimizer with the groups of the saved run (groups "
            "added to them after)"
        )
    group_names = group_names[: len(names)] if added else group_names
    if names is not None and len(names) != len(group_names):
        return f"names {len(names)} parameter groups, and this optimizer has {len(group_names)}"
    if names is not None and [sorted(g) for g in names] != [sorted(g) for g in group_names]:
        i = next(i for i, (a, b) in enumerate(zip(names, group_names)) if sorted(a) != sorted(b))
        return (
            f"was saved with other parameters in group {i} ({first_few(names[i])}; this optimizer's: "
            f"{first_few(group_names[i])}): each group's hyperparameters would go to other "
            "parameters; build the optimizer's groups in the order of the saved run"
        )
    return None


def check_model(data: dict[str, Any], path: str | os.PathLike[str], model: torch.nn.Module) -> None:
    """Check that checkpoint ``data`` (read from ``path``) holds weights of ``model``.

    Raises:
        CheckpointError: made for another model (class, parameter names or shapes).
    """
    expected = type(model).__qualname__
    misfit = misfits(data["state_dict"], model)
    if data["model_class"] != expected or misfit:
        raise CheckpointError(
            f"checkpoint {path} holds weights of {data['model_class']} that do not match this "
            f"{expected}{f' ({misfit})' if misfit else ''}: load it into a pipeline of the same model"
        )


def keyed_as_template(owned: dict[str, torch.Tensor], template: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The stages' weights ``owned`` (by graph name) keyed exactly like ``template``'s
    ``state_dict()``, on the CPU, a shared (tied) tensor's names holding one tensor, as there;
    a name no stage holds keeps the template's value."""
    aliases = same_tensor_names(template)  # a shared module's buffers too
    result: dict[str, torch.Tensor] = {}
    for key, value in template.state_dict().items():
        twin = next((result[a] for a in aliases.get(key, []) if a in result), None)
        if twin is not None:
            result[key] = twin
            continue
        source = owned.get(key)
        if source is None:
            source = next((owned[a] for a in aliases.get(key, []) if a in owned), None)
        result[key] = (source if source is not None else value).detach().cpu().clone()
    return result


def copy_unsaved_buffers(owned: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    """Copy into ``module`` the stages' values (``owned``, by graph name) of its buffers that
    its ``state_dict()`` leaves out (registered with ``persistent=False``)."""
    saved = set(module.state_dict())
    aliases = same_tensor_names(module)
    with torch.no_grad():
        for name, buffer in module.named_buffers(remove_duplicate=False):
            source = next((owned[n] for n in (name, *aliases.get(name, [])) if n in owned), None)
            if name not in saved and source is not None:
                buffer.copy_(source)


class Checkpoints:
    """Saving and loading a :class:`~pipeoptim.pipeline.Pipeline` (a mixin of it)."""

    _template: torch.nn.Module  # the original model's structure (to_module's)
    _optimizer: torch.optim.Optimizer  # the user's optimizer
    method: str
    plan: Any  # pipeoptim.compiler.plan.Plan
    mini_batches_done: int
    state_dict: Callable[[], dict[str, torch.Tensor]]
    load_state_dict: Callable[[dict[str, torch.Tensor]], None]
    optimizer_state_dict: Callable[[], dict[str, Any]]
    load_optimizer_state_dict: Callable[[dict[str, Any]], None]
    _executor: Any  # its same_call: under torchrun every rank in the same call
    _guarded: Callable[[Callable[[], Any]], Any]  # the pipeline's: a lost peer stops it
    spec: Any  # pipeoptim.runtime.build.PipelineSpec: group_names

    def save_checkpoint(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        """Flush, then write weights, optimizer state, position and plan to ``path`` atomically
        (:func:`pipeoptim.checkpoint.save_checkpoint`); under torchrun on every rank at once."""
        self._guarded(lambda: self._executor.same_call("save_checkpoint"))
        state = {
            "model_class": type(self._template).__qualname__,
            "method": self.method,
            "state_dict": self.state_dict(),
            "optimizer": self.optimizer_state_dict(),
            "mini_batches": self.mini_batches_done,
            "plan": self.plan.to_dict(),
            "extra": extra or {},
        }
        save_checkpoint(path, state)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Continue from a checkpoint; returns the ``extra`` saved with it.

        Raises:
            CheckpointError: missing, corrupt, or from another model.
            PipelineError: under torchrun, the ranks were given different checkpoints
                (``RanksInOtherCallsError`` on every rank at once; before, the others waited out
                the timeout: helper-130).
        """
        failure = None
        try:
            data = read_checkpoint(path)
            check_model(data, path, self._template)
            misfit = optimizer_misfit(
                data["optimizer"], self._optimizer, self._template, self.spec.group_names
            )
            if misfit:  # before any weight is loaded
                raise CheckpointError(f"checkpoint {path} {misfit}")
        except CheckpointError as exc:
            failure = exc
        self._guarded(lambda: self._executor.same_call("load_checkpoint", failure))  # raises it, or another's
        self.load_state_dict(data["state_dict"])
        self.load_optimizer_state_dict(data["optimizer"])
        return data["extra"]


@torch.inference_mode(False)  # a model to train on, also where the caller is in inference mode (helper-180)
def trained_module(template: torch.nn.Module, owned: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``template`` (the original model) holding ``owned``, the stages' parameters and
    buffers (:meth:`~pipeoptim.pipeline.Pipeline.to_module`), non-persistent buffers too."""
    module = copy.deepcopy(template)
    module.load_state_dict(keyed_as_template(owned, template))
    copy_unsaved_buffers(owned, module)
    return module
