"""What a loss function computes, as a key of the loss's cached timing (:func:`loss_identity`,
:mod:`pipeoptim.loss_cost`).

The key must differ wherever the loss's work may: a closure over another count, a callable
object or bound method of another state, a loss module with another head, a partial of other
arguments, a configuration nested in dataclasses, a class attribute, a module-level value the
loss or its class's methods read (a module, a tensor, a setting from the command line). Values
are described to :data:`DEPTH` levels of containers and objects: a module whole (its classes'
source, code and class attributes, its settings, its tensors' shapes), a tensor or NumPy array
by shape and dtype, a class by the code, class attributes and read module-level values of
every method it has or inherits from a class that is not torch's or Python's, a container by
its length and first :data:`SHOWN` items, at most :data:`BUDGET` items in all (a dict of a
million entries took 1.2 s to describe whole, helper-174; a list of 300 x 300 x 300, 2.9 s
with the cap per level, helper-175). Unlike a profile's key
(:mod:`pipeoptim.compiler.graph_identity`), it need not agree between ranks: only the process
that plans reads it, so mutable module-level values count too. It is the same in every
process for the same loss: no memory address, no hash order (a set literal in a loss's code
is a frozenset constant whose order changes with ``PYTHONHASHSEED``: it keyed the same loss
anew in every run, helper-175).

Not described: what an iterator or generator will yield, tensor values (the cost follows the
shapes), items beyond the first :data:`SHOWN` of a container.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeoptim.compiler.graph_identity import WALK, global_names, leaf_identity, settled_text

#: levels of containers and objects described (a dataclass in a dataclass in a dict in an
#: object's state is 4: the profile's depth, which stopped short of it, helper-174)
DEPTH = 10
#: items of one container described; beyond them its length stands for the rest
SHOWN = 256
#: objects and items described in all; beyond them a value is described by its type alone
#: (torch.compile's wrapper of a loss reaches tens of thousands of objects, walked as a tree)
BUDGET = 5_000
#: classes whose code is torch's or Python's (keyed by their versions, not described)
_LIBRARY = ("torch", "builtins", "abc", "typing", "collections", "enum", "functools")


def loss_identity(loss_fn: Callable[..., Any]) -> str:
    """``loss_fn``'s name and a digest of its description (module docstring)."""
    if isinstance(loss_fn, (types.FunctionType, types.MethodType)):
        name = loss_fn.__qualname__
    else:
        name = type(loss_fn).__qualname__  # an object's __getattr__ may raise on "__qualname__"
    text = repr(_Describer().describe(loss_fn, DEPTH))
    return f"{name} {hashlib.sha256(text.encode()).hexdigest()[:16]}"


class _Describer:
    """One description: the objects being described (a cycle ends there) and the items left."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.left = BUDGET
        self.classes: dict[type, object] = {}  # a model's 48 blocks of one class: described once
        self.sources: dict[str, str] = {}  # by module name

    def describe(self, value: object, depth: int) -> object:
        """``value`` as comparable, printable structure."""
        if isinstance(value, (complex, bytes)):
            return value
        settled = settled_text(value)
        if settled is not WALK:
            return settled
        if depth <= 0 or id(value) in self.seen or self.left <= 0:
            return _type_name(value)
        self.left -= 1  # every object counts: a graph of objects is walked as a tree
        self.seen.add(id(value))
        try:
            return self._inner(value, depth - 1)
        finally:
            self.seen.discard(id(value))

    def _inner(self, value: object, depth: int) -> object:
        if isinstance(value, nn.Module):
            tensors = [*value.named_parameters(), *value.named_buffers()]
            classes = [self._class(type(m), depth) for m in value.modules()]
            shapes = [f"{name} {tuple(t.shape)} {t.dtype}" for name, t in tensors]
            return [[leaf_identity(m) for m in value.modules()], classes, shapes]
        if isinstance(value, torch.jit.ScriptFunction):
            return ["script", value.code]
        if isinstance(value, (staticmethod, classmethod)):
            return self.describe(value.__func__, depth)
        if isinstance(value, property):
            return ["property", *(self.describe(f, depth) for f in (value.fget, value.fset))]
        if isinstance(value, types.MethodType):
            return ["method", self.describe(value.__func__, depth), self.describe(value.__self__, depth)]
        if isinstance(value, types.FunctionType):
            return self._function(value, depth)
        if isinstance(value, functools.partial):
            return ["partial", *(self.describe(v, depth) for v in (value.func, value.args, value.keywords))]
        if isinstance(value, (list, tuple, set, frozenset, dict)):
            items = list(value.items()) if isinstance(value, dict) else list(value)
            shown = items[: min(SHOWN, self.left)]
            self.left -= len(shown)
            described = [self.describe(v, depth) for v in shown]
            if isinstance(value, (set, frozenset, dict)):
                described.sort(key=repr)
            return [type(value).__name__, len(items), described]
        if isinstance(value, type):
            return self._class(value, depth)
        if isinstance(value, (types.BuiltinFunctionType, types.ModuleType)):
            return _type_name(value)
        return self._object(value, depth)

    def _function(self, fn: types.FunctionType, depth: int) -> object:
        """A function by the source of its file (without one, its code alone), its code, its
        defaults, the values it closes over and the module-level values it reads."""
        source = self._source(fn)
        cells = []
        for cell in fn.__closure__ or ():
            try:
                cells.append(self.describe(cell.cell_contents, depth))
            except ValueError:  # an empty cell
                cells.append("empty")
        names, _ = global_names(fn.__code__)
        read = [
            (n, self.describe(fn.__globals__[n], depth))
            for n in sorted(names)
            if n in fn.__globals__ and not isinstance(fn.__globals__[n], types.ModuleType)
        ]
        defaults = self.describe((fn.__defaults__, fn.__kwdefaults__), depth)
        return ["function", fn.__qualname__, source, _code(fn.__code__), defaults, cells, read]

    def _source(self, fn: types.FunctionType) -> str:
        """A digest of the source of ``fn``'s file ("" without one), read once per file."""
        module = inspect.getmodule(fn)
        key = module.__name__ if module is not None else fn.__qualname__
        if key not in self.sources:
            try:
                text = inspect.getsource(module or fn)
            except (OSError, TypeError):
                text = ""
            self.sources[key] = hashlib.sha256(text.encode()).hexdigest() if text else ""
        return self.sources[key]

    def _class(self, cls: type, depth: int) -> object:
        """A class by what it and its bases that are not torch's or Python's hold: methods
        (with what they read), properties and class attributes, by name."""
        if cls not in self.classes:
            self.classes[cls] = cls.__qualname__  # while described: a method reading its class
            self.classes[cls] = self._members(cls, depth)
        return self.classes[cls]

    def _members(self, cls: type, depth: int) -> object:
        own = [k for k in cls.__mro__ if str(k.__module__).split(".")[0] not in _LIBRARY]
        members = [
            (f"{k.__qualname__}.{name}", member)
            for k in own
            for name, member in sorted(vars(k).items())
            if name not in ("__dict__", "__weakref__", "__module__", "__doc__", "__slots__")
        ]
        return [cls.__qualname__, [(name, self.describe(member, depth)) for name, member in members]]

    def _object(self, value: object, depth: int) -> object:
        """Another object: its class (:meth:`_class`) and its state (a dataclass's fields,
        ``__dict__``, ``__slots__``); an attribute that cannot be read, by that."""
        cls = type(value)
        state: dict[str, Any] = {}
        names = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else []
        for klass in cls.__mro__:
            slots = vars(klass).get("__slots__", ())
            names += [
                s
                for s in ((slots,) if isinstance(slots, str) else slots)
                if s not in ("__dict__", "__weakref__")
            ]
        for name in names:
            state[name] = _read(value, name)
        own = _read(value, "__dict__")
        state.update(own if isinstance(own, dict) else {})
        described = sorted(((k, self.describe(v, depth)) for k, v in state.items()), key=repr)
        return [self._class(cls, depth), described]


def _read(value: object, name: str) -> object:
    """``value.name``, or what stopped its reading."""
    try:
        return getattr(value, name)
    except Exception as exc:  # an unset slot, or a property that raises
        return f"unreadable ({type(exc).__name__})"


def _type_name(value: object) -> str:
    """A class, builtin function or module by its name; another value by its type's."""
    if isinstance(value, (type, types.BuiltinFunctionType, types.ModuleType)):
        return (
            getattr(value, "__qualname__", None)
            or getattr(value, "__name__", None)
            or type(value).__qualname__
        )
    return type(value).__qualname__


def _code(code: types.CodeType) -> object:
    """Bytecode, names and constants, nested code included (whose repr holds an address), a
    frozenset constant sorted (its order follows the hash seed)."""
    return [code.co_code.hex(), code.co_names, [_constant(c) for c in code.co_consts]]


def _constant(value: object) -> object:
    if isinstance(value, types.CodeType):
        return _code(value)
    if isinstance(value, frozenset):
        return ["frozenset", sorted(repr(_constant(v)) for v in value)]
    if isinstance(value, tuple):
        return [_constant(v) for v in value]
    return repr(value)
