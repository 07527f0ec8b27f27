"""What a traced graph is (:func:`graph_hash`): the key under which its profiles are reused
(:mod:`pipeoptim.compiler.profile_key`) and against which a plan handed to ``compile`` is
checked."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable

import torch.fx as fx
from torch import nn

#: attribute values of a leaf module that go into the hash (numbers, flags, names)
_PLAIN = (bool, int, float, str, type(None))


def graph_hash(gm: fx.GraphModule, leaves: Iterable[str] = ()) -> str:
    """sha256 of the graph's code, the names, shapes and dtypes of its parameters and buffers,
    its modules' class names, and, for each leaf module (``leaves``: qualified names; one node
    each, its forward not in the graph's code) and the modules inside it, its class's source
    and its plain attributes (:func:`leaf_identity`). Without the last, a leaf whose loop ran
    200 times instead of once, or whose forward was edited, reused the old profile: its plan
    predicted 0.86 ms for a 75 ms stage."""
    h = hashlib.sha256(gm.code.encode())
    for name, t in sorted(gm.state_dict(keep_vars=True).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{getattr(t, 'requires_grad', False)}".encode())
    prefixes = tuple(sorted(leaves))
    for name, mod in sorted(gm.named_modules()):
        h.update(f"{name}:{type(mod).__qualname__}".encode())
        if name and isinstance(mod, fx.GraphModule):  # a checkpointed region's graph
            h.update(mod.code.encode())
        if name and any(name == p or name.startswith(p + ".") for p in prefixes):
            h.update(leaf_identity(mod).encode())
    return h.hexdigest()


def leaf_identity(module: nn.Module) -> str:
    """The source of ``module``'s class (its qualified name where the source cannot be read)
    and its own attributes that are plain values or lists, tuples and dicts of them
    (``self.iterations = 200``; not the train/eval flag), sorted."""
    cls = type(module)
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = f"{cls.__module__}.{cls.__qualname__}"
    plain = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _plain(v)}
    return source + repr(sorted(plain.items()))


def _plain(value: object) -> bool:
    """A plain value, or a list, tuple or dict (of str keys) of them: a leaf's ``self.slopes =
    [0.1]`` or ``self.cfg = {"slope": 0.1}`` counts as ``self.slope = 0.1`` does (helper-103: a
    torchrun rank whose leaf held 3.0 there trained beside rank 0's 0.1, silently)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return isinstance(value, _PLAIN)
