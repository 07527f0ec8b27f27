"""Under torchrun, rank 0's initial state on every rank.

Every rank builds its stage from its own copy of the model, and ranks need not have drawn the
same weights (no common seed). Rank 0 therefore sends each stage the initial values of what
it holds: parameters, buffers and constants (plain tensor attributes the graph reads, found
in its traced graph module by the stages' names), a sparse one pickled (``send`` refuses
it). It also sends what no stage holds but ``Pipeline.state_dict()`` and
``to_module()`` read from each rank's model copy: buffers no stage reads and the model's
plain tensor attributes (helper-90: rank 1's checkpoint held its own unused buffer, and its
``to_module()`` its own constants, 0.42 off rank 0's outputs; a constant in a list kept its
own in training, loss 0.08 off).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeoptim.compiler.trace_guards import contents, plain_attributes


def find_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor of ``model`` at the qualified ``name`` (submodules, attributes, list and
    tuple indices, dict keys: ``blocks.0.scale``, ``lst.0``); ``None`` where there is none."""
    value: Any = model
    for part in name.split("."):
        if isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            value = getattr(value, part, None)
        if value is None:
            return None
    return value.detach() if isinstance(value, torch.Tensor) else None


def plain_tensors(model: nn.Module) -> dict[str, Any]:
    """``model``'s plain attributes holding tensors (alone, or in lists, tuples, dicts or
    deques), by qualified name."""
    return {
        f"{prefix}.{attr}" if prefix else attr: value
        for prefix, _, attr, value in plain_attributes(model)
        if any(isinstance(item, torch.Tensor) for item in contents(value))
    }


def share_initial_state(
    stage: nn.Module,
    traced: nn.Module,
    model: nn.Module,
    rank: int,
    world: int,
    group: Any,
    device: torch.device,
) -> None:
    """Make ``stage`` (this rank's stage module) and ``model`` (this rank's model copy) hold
    rank 0's initial values (see the module's docstring); every rank of the job calls it.
    ``traced``: this rank's traced graph module, which holds every stage's tensors under the
    stages' names (a constant fx made of ``self.lst[0]`` is ``_tensor_constant0`` there).
    ``group``: the pipeline's own process group (of every rank), which the script's own
    collectives on the default group never meet."""
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, sorted(stage.state_dict()), group=group)
    box: list[Any] = [None]
    if rank == 0:
        asked = {name for names in parts[1:] for name in names}
        values = {name: t for name in asked if (t := find_tensor(traced, name)) is not None}
        held = {name for names in parts for name in names}
        rest = {name: t for name, t in model.state_dict().items() if name not in held}
        pickled = {name: t for name, t in values.items() if t.layout != torch.strided}
        box = [(sorted(values), pickled, rest, plain_tensors(model))]
    dist.broadcast_object_list(box, src=0, group=group)
    sent, pickled, rest, plain = box[0]
    if rank == 0:
        for peer in range(1, world):
            for name in parts[peer]:
                if name in sent and name not in pickled:
                    dist.send(values[name].contiguous().to(device), peer, group=group)
        return
    state = stage.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in parts[rank]:
            if name in pickled:
                state[name].copy_(pickled[name].to(device))
            elif name in sent:
                buffer = torch.empty_like(state[name].detach())
                dist.recv(buffer, 0, group=group)
                state[name].copy_(buffer)
        for name, value in rest.items():
            mine = find_tensor(model, name)
            if mine is not None:
                mine.copy_(value)
    for name, value in plain.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, value)
