"""What a traced graph is (:func:`graph_hash`): the key under which its profiles are reused
(:mod:`pipeoptim.compiler.profile_key`) and against which a plan handed to ``compile`` is
checked."""

from __future__ import annotations

import enum
import hashlib
import inspect
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

#: attribute values of a leaf module that go into the hash as they are (numbers, flags, names)
_PLAIN = (bool, int, float, str, type(None))
#: how deep :func:`_described` follows containers and objects' attributes
_DEPTH = 4


def graph_hash(gm: fx.GraphModule, leaves: Iterable[str] = ()) -> str:
    """sha256 of the graph's code, the names, shapes and dtypes of its parameters and buffers
    (those kept out of the ``state_dict`` too), its modules' class names, and, for each module
    that runs its own forward (a leaf: one node, its forward not in the graph's code; those in
    ``leaves`` and every module the graph calls whole, as it does dropout, batch norm,
    recurrent layers and attention) and the modules inside it, :func:`leaf_identity`.

    Without the leaves, one whose loop ran 200 times instead of once, or whose forward was
    edited, reused the old profile (its plan predicted 0.86 ms for a 75 ms stage); without the
    built-in leaves, attention of 64 heads reused the profile of 1 (2.2x too fast), and a
    dropout in eval mode or of p 0.0 that of one at 0.5 (the mask's bytes missing);
    without the buffers kept out of the ``state_dict``, a leaf's cache of 256 x 16384 values
    reused that of 256 x 64 (helper-115)."""
    h = hashlib.sha256(gm.code.encode())
    for name, t in sorted(gm.state_dict(keep_vars=True).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{getattr(t, 'requires_grad', False)}".encode())
    persistent = gm.state_dict(keep_vars=True).keys()
    for name, t in sorted(gm.named_buffers()):
        if name not in persistent:
            h.update(f"{name} (not persistent):{tuple(t.shape)}:{t.dtype}".encode())
    prefixes = tuple(sorted(set(leaves) | called_whole(gm)))
    for name, mod in sorted(gm.named_modules()):
        h.update(f"{name}:{type(mod).__qualname__}".encode())
        if name and isinstance(mod, fx.GraphModule):  # a checkpointed region's graph
            h.update(mod.code.encode())
        if name and any(name == p or name.startswith(p + ".") for p in prefixes):
            h.update(leaf_identity(mod).encode())
    return h.hexdigest()


def called_whole(gm: fx.GraphModule) -> set[str]:
    """The submodules of ``gm`` that its graph runs by their own forward: targets of
    ``call_module`` nodes and modules fetched by ``get_attr`` (a leaf called with its
    parameters given, :func:`pipeoptim.compiler.trace.call_leaf`)."""
    called = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" or (
            node.op == "get_attr" and isinstance(_fetch(gm, str(node.target)), nn.Module)
        ):
            called.add(str(node.target))
    return called


def _fetch(gm: nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def leaf_identity(module: nn.Module) -> str:
    """The source of the file defining ``module``'s class (a helper or a constant the forward
    reads there counts; the class's qualified name where it cannot be read), whether it is in
    training mode, and its own attributes other than modules, parameters and buffers, sorted:
    plain values, lists, tuples and dicts of them, tensors by shape and dtype, and objects
    (a config dataclass, a numpy number) by their type and attributes (:func:`_described`)."""
    cls = type(module)
    try:
        source = inspect.getsource(inspect.getmodule(cls) or cls)
    except (OSError, TypeError):
        source = f"{cls.__module__}.{cls.__qualname__}"
    own = {
        k: _described(v, _DEPTH) for k, v in vars(module).items() if not k.startswith("_") and k != "training"
    }
    return f"{source}{cls.__qualname__} training={module.training} {sorted(own.items())!r}"


def _described(value: object, depth: int) -> object:
    """``value`` as text that is the same in every process for the same value (no addresses):
    a plain value itself; a list, tuple or dict of them element by element (a leaf's
    ``self.slopes = [0.1]`` counts as ``self.slope = 0.1`` does: helper-103's torchrun rank whose
    leaf held 3.0 there trained beside rank 0's 0.1, silently); a tensor by shape and dtype; a
    numpy number by its value; another object by its type and, to ``depth`` levels, its
    attributes; a function or class by its qualified name."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if depth <= 0:
        return type(value).__qualname__
    if isinstance(value, (list, tuple)):
        return [_described(v, depth - 1) for v in value]
    if isinstance(value, dict):
        return sorted((repr(k), _described(v, depth - 1)) for k, v in value.items())
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return _described(value.item(), depth - 1)
    if isinstance(value, enum.Enum):
        return repr(value)
    if callable(value) or isinstance(value, type):
        return getattr(value, "__qualname__", type(value).__qualname__)
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):
        return [type(value).__qualname__, _described(state, depth - 1)]
    return type(value).__qualname__
