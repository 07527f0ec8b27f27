"""What a traced graph is (:func:`graph_hash`): the key under which its profiles are reused
(:mod:`pipeoptim.compiler.profile_key`) and against which a plan handed to ``compile`` is
checked."""

from __future__ import annotations

import dataclasses
import dis
import enum
import functools
import hashlib
import inspect
import sys
import types
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
    edited, reused the old profile (its plan predicted 0.86 ms for a 75 ms stage); a function
    the graph calls whole (``torch.fx.wrap``) goes in by :func:`function_identity` (an edited
    helper reused its profile, 133x too fast: helper-129); without the
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
    for node in gm.graph.nodes:  # a function the graph calls whole (torch.fx.wrap), by its code
        fn = node.target
        if node.op == "call_function" and isinstance(fn, types.FunctionType) and not _from_torch_or_us(fn):
            h.update(function_identity(fn).encode())
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


#: the attributes every module has (its parameters, buffers, submodules, hooks, mode)
_MODULE_OWN = frozenset(vars(nn.Module()))


def leaf_identity(module: nn.Module) -> str:
    """The source of the file defining ``module``'s class (a helper or a constant the forward
    reads there counts; where it cannot be read, as for a class defined in ``python -c`` or a
    notebook, the compiled code of the class's functions), whether it is in training mode, and
    its own attributes other than what every module has (parameters, buffers, submodules,
    hooks), private ones included, sorted, as :func:`_described` gives them."""
    cls = type(module)
    try:
        source = inspect.getsource(inspect.getmodule(cls) or cls)
    except (OSError, TypeError):
        source = repr(_described(dict(vars(cls)), _DEPTH))
    own = {k: _described(v, _DEPTH) for k, v in vars(module).items() if k not in _MODULE_OWN}
    read = [_globals_read(f) for f in vars(cls).values() if isinstance(f, types.FunctionType)]
    return f"{source}{cls.__qualname__} training={module.training} {sorted(own.items())!r} {read!r}"


def function_identity(fn: types.FunctionType) -> str:
    """A function the graph calls whole, as :func:`leaf_identity` keys a leaf: the source of
    its file (or, without one, its compiled code), its code, defaults and closure, and the
    module-level values it reads (:func:`_globals_read`)."""
    try:
        source = inspect.getsource(inspect.getmodule(fn) or fn)
    except (OSError, TypeError):
        source = ""
    return f"{source}{_function(fn, _DEPTH)!r} {_globals_read(fn)!r}"


def _globals_read(fn: types.FunctionType) -> list[object]:
    """The module-level settings ``fn`` reads by name (in its code and the code nested in it):
    plain values (numbers, strings, flags, and tuples and frozensets of them, dtypes, enums)
    as they are, functions by their code (a helper imported from another file, whose source is
    not the file's). A setting computed at import (``REPEAT = int(os.environ["REPEAT"])``) is
    the same text in the file, another value in the process. Left out: names ``fn`` assigns
    itself (a counter), and mutable values (a list, a dict, an object), which the script may
    change between this process's trace and a worker's, whose graph would then differ. A
    setting read through the user's own module (``import cfg`` ... ``cfg.REPEAT``) counts as
    ``cfg.REPEAT``: those attributes of it the code names (``co_names`` holds both; before, an
    edit of cfg.py reused the profile of the old value, helper-136)."""
    names, stored = global_names(fn.__code__)
    found = [(n, fn.__globals__[n]) for n in sorted(names - stored) if n in fn.__globals__]
    for n, v in found:  # grows: a package's submodule (cfgpkg.settings.REPEAT) is walked in turn
        if isinstance(v, types.ModuleType) and _users_own(v) and n.count(".") < _DEPTH:
            found += [(f"{n}.{a}", getattr(v, a)) for a in sorted(names) if hasattr(v, a)]
    return [
        (n, _function(v, 2) if isinstance(v, types.FunctionType) else _described(v, 1))
        for n, v in found
        if isinstance(v, types.FunctionType) or _settled(v)
    ]


def _users_own(module: types.ModuleType) -> bool:
    """Whether ``module`` is the user's (not the standard library's or an installed package's,
    whose attributes change with their versions only)."""
    root = module.__name__.split(".")[0]
    # a namespace package has no __file__, only the folders it spans
    path = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "")
    installed = any(part in path for part in ("site-packages", "dist-packages"))
    return bool(path) and root not in sys.stdlib_module_names and not installed


def global_names(code: types.CodeType) -> tuple[set[str], set[str]]:
    """The names ``code`` and the code nested in it use (``co_names``: module-level names and
    attributes alike), and those of them it assigns or deletes at module level."""
    codes, names, stored = [code], set(), set()
    while codes:
        current = codes.pop()
        names.update(current.co_names)
        stored.update(i.argval for i in dis.get_instructions(current) if i.opname in _GLOBAL_WRITES)
        codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return names, stored


#: the instructions that change a module-level name
_GLOBAL_WRITES = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL"})


def _settled(value: object) -> bool:
    """Whether ``value`` cannot change in place: a plain value, a dtype, device or enum, or a
    tuple or frozenset of such."""
    if isinstance(value, (_PLAIN, torch.dtype, torch.device, enum.Enum)):
        return True
    return isinstance(value, (tuple, frozenset)) and all(_settled(v) for v in value)


def _from_torch_or_us(fn: types.FunctionType) -> bool:
    """Whether ``fn`` is torch's or pipeoptim's (keyed by torch's version and ours)."""
    owner = getattr(fn, "__module__", None) or ""
    return owner.split(".")[0] in ("torch", "pipeoptim", "operator", "_operator", "builtins", "math")


#: what :func:`settled_text` returns for a value that must be walked to be described
WALK = object()


def settled_text(value: object) -> object:
    """``value`` described without walking it: a plain value as it is, a tensor or NumPy array
    by shape and dtype, a ``torch.dtype``, device, enum or NumPy number by its value;
    :data:`WALK` for any other value."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)):
        return str(value)
    if type(value).__module__ == "numpy":
        if getattr(value, "ndim", 0):
            return f"array {tuple(value.shape)} {value.dtype}"  # type: ignore[attr-defined]
        item = value.item() if hasattr(value, "item") else None
        return item if isinstance(item, _PLAIN) and item is not None else type(value).__qualname__
    return WALK


def _described(value: object, depth: int) -> object:
    """``value`` as text that is the same in every process for the same value (no addresses,
    no hash order): a plain value itself; lists, tuples, dicts and sets element by element (a
    leaf's ``self.slopes = [0.1]`` counts as ``self.slope = 0.1`` does: helper-103's torchrun
    rank whose leaf held 3.0 there trained beside rank 0's 0.1, silently); a tensor or numpy
    array by shape and dtype, a numpy number or ``torch.dtype`` by its value; a function by its
    qualified name, compiled code, defaults and the values it closes over (a
    ``functools.partial`` by its function and arguments); another object (a config
    dataclass, slotted or not) by its type and, to ``depth`` levels, its attributes."""
    settled = settled_text(value)
    if settled is not WALK:
        return settled
    if depth <= 0:
        return type(value).__qualname__
    inner = depth - 1
    if isinstance(value, (list, tuple)):
        return [_described(v, inner) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_described(v, inner) for v in value), key=repr)
    if isinstance(value, dict):
        return sorted(((_described(k, inner), _described(v, inner)) for k, v in value.items()), key=repr)
    if isinstance(value, functools.partial):
        return [
            "partial",
            _described(value.func, inner),
            _described(value.args, inner),
            _described(value.keywords, inner),
        ]
    if isinstance(value, (types.FunctionType, types.MethodType)):
        return _function(value, inner)
    if isinstance(value, types.CodeType):  # its constants in full: nested code ends
        return [value.co_code.hex(), value.co_names, _described(value.co_consts, _DEPTH)]
    if isinstance(value, (type, types.BuiltinFunctionType, types.ModuleType)) or value is None:
        return getattr(value, "__qualname__", getattr(value, "__name__", type(value).__qualname__))
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
        return [type(value).__qualname__, _described(fields, inner)]
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):
        return [type(value).__qualname__, _described(state, inner)]
    return type(value).__qualname__


def _function(fn: types.FunctionType | types.MethodType, depth: int) -> object:
    """A function by name, code, defaults and closure (``lambda x: x * n`` with another ``n``
    is another function); a bound method as its function."""
    if isinstance(fn, types.MethodType):
        return _function(fn.__func__, depth)  # type: ignore[arg-type]
    cells = [c.cell_contents for c in fn.__closure__ or () if _filled(c)]
    parts = (fn.__code__, fn.__defaults__, fn.__kwdefaults__, cells)
    return [fn.__qualname__, _described(parts, depth)]


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True
