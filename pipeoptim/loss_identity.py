"""What a loss function computes, as a key of the loss's cached timing (:func:`loss_identity`,
:mod:`pipeoptim.loss_cost`).

The key must differ wherever the loss's work may: a closure over another count, a callable
object or bound method of another state, a loss module with another head, a partial of other
arguments, a configuration nested in dataclasses, a module or tensor the loss reads at module
level. Every value is described in full to :data:`DEPTH` levels of containers and objects (a
module whole, by the source and code of its classes, its settings and its tensors' shapes;
a tensor by shape and dtype), a container of more than :data:`SHOWN` items by its length and
first items (a dict of a million entries took 1.2 s to describe whole, helper-174). Unlike a
profile's key (:mod:`pipeoptim.compiler.graph_identity`), it need not agree between ranks:
only the process that plans reads it, so mutable module-level values count too.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeoptim.compiler.graph_identity import global_names, leaf_identity

#: levels of containers and objects described (a dataclass in a dataclass in a dict in an
#: object's state is 4: the profile's depth, which stopped short of it, helper-174)
DEPTH = 10
#: items of a container described; beyond them its length stands for the rest
SHOWN = 256
_PLAIN = (bool, int, float, str, bytes, type(None))


def loss_identity(loss_fn: Callable[..., Any]) -> str:
    """``loss_fn``'s name and a digest of :func:`describe` of it, the same in every process
    for the same computation (no memory address, no hash order)."""
    if isinstance(loss_fn, (types.FunctionType, types.MethodType)):
        name = loss_fn.__qualname__
    else:
        name = type(loss_fn).__qualname__  # an object's __getattr__ may raise on "__qualname__"
    text = repr(describe(loss_fn, DEPTH, frozenset()))
    return f"{name} {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def describe(value: object, depth: int, seen: frozenset[int]) -> object:
    """``value`` as comparable, printable structure (module docstring); ``seen``: the ids of
    the objects being described, so that a cycle ends."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)):
        return str(value)
    if depth <= 0 or id(value) in seen:
        return type(value).__qualname__
    seen, inner = seen | {id(value)}, depth - 1
    if isinstance(value, nn.Module):
        tensors = [*value.named_parameters(), *value.named_buffers()]
        return [
            [[leaf_identity(m), _class_code(type(m))] for m in value.modules()],
            [f"{name} {tuple(t.shape)} {t.dtype}" for name, t in tensors],
        ]
    if isinstance(value, torch.jit.ScriptFunction):
        return ["script", value.code]
    if isinstance(value, (staticmethod, classmethod)):
        return describe(value.__func__, depth, seen)
    if isinstance(value, types.MethodType):
        return ["method", describe(value.__func__, inner, seen), describe(value.__self__, inner, seen)]
    if isinstance(value, types.FunctionType):
        return _function(value, inner, seen)
    if isinstance(value, functools.partial):
        return ["partial", *(describe(v, inner, seen) for v in (value.func, value.args, value.keywords))]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, len(value), [describe(v, inner, seen) for v in value[:SHOWN]]]
    if isinstance(value, (set, frozenset, dict)):
        items = list(value.items()) if isinstance(value, dict) else list(value)
        shown = [describe(v, inner, seen) for v in items[:SHOWN]]
        return [type(value).__name__, len(items), sorted(shown, key=repr)]
    if isinstance(value, (type, types.BuiltinFunctionType, types.ModuleType)):
        return getattr(value, "__qualname__", getattr(value, "__name__", type(value).__qualname__))
    return _object(value, inner, seen)


def _function(fn: types.FunctionType, depth: int, seen: frozenset[int]) -> object:
    """A function by the source of its file (or, without one, nothing more than its code),
    its code, its defaults, the values it closes over and the module-level values it reads
    (those the profile's key leaves out too: a module, a tensor, a dict)."""
    try:
        source = inspect.getsource(inspect.getmodule(fn) or fn)
    except (OSError, TypeError):
        source = ""
    defaults = describe((fn.__defaults__, fn.__kwdefaults__), depth, seen)
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(describe(cell.cell_contents, depth, seen))
        except ValueError:  # an empty cell
            cells.append("empty")
    names, _ = global_names(fn.__code__)
    read = [
        (n, describe(fn.__globals__[n], depth, seen))
        for n in sorted(names)
        if n in fn.__globals__ and not isinstance(fn.__globals__[n], (types.ModuleType, type))
    ]
    return ["function", fn.__qualname__, source, _code(fn.__code__), defaults, cells, read]


def _object(value: object, depth: int, seen: frozenset[int]) -> object:
    """Another object: its class's ``__call__`` (a callable object) and code, and its state
    (a dataclass's fields, ``__dict__`` and ``__slots__``)."""
    cls = type(value)
    state: dict[str, Any] = {}
    if dataclasses.is_dataclass(value):
        state = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
    state.update(getattr(value, "__dict__", None) or {})
    for klass in cls.__mro__:
        slots = vars(klass).get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                state[slot] = getattr(value, slot)
    described = sorted(((k, describe(v, depth, seen)) for k, v in state.items()), key=repr)
    return [cls.__qualname__, _class_code(cls), described]


def _class_code(cls: type) -> list[object]:
    """The compiled code of ``cls``'s own functions (static and class methods too): a class
    defined by ``exec`` in another script has no source of its own to read."""
    code = []
    for name, member in sorted(vars(cls).items()):
        fn = getattr(member, "__func__", member)
        if isinstance(fn, types.FunctionType):
            code.append([name, _code(fn.__code__)])
    return code


def _code(code: types.CodeType) -> object:
    """Bytecode, names and constants, nested code included (whose repr holds an address)."""
    consts = [_code(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return [code.co_code.hex(), code.co_names, consts]
