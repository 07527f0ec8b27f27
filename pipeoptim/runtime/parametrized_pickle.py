"""Pickling modules with parametrized tensors (``torch.nn.utils.parametrize``) for the stage
worker processes.

A parametrized module (``nn.utils.parametrizations.spectral_norm``, ``weight_norm``,
``orthogonal``, or any ``register_parametrization``) is an instance of a class torch makes for
it at registration (``Parametrized<Class>``, a subclass with a property per parametrized
tensor), whose ``__getstate__`` raises: torch serialises such modules "only through
state_dict()". A stage holds the module itself, though, so :class:`Pickler` sends what the
module is made of instead: its original class, its ``__dict__`` (the ``parametrizations``
holding the original tensors, ``original`` or ``original0``, ``original1`` …, and each
parametrization module with its buffers, such as spectral_norm's power-iteration vectors ``_u``
and ``_v``), and the names of the parametrized tensors. The worker builds the module from them
the way ``register_parametrization`` does on a first registration (the class made again, a
property per name), without calling ``right_inverse``: every tensor arrives bit for bit.
"""

from __future__ import annotations

import io
from typing import Any

import cloudpickle
from torch import nn
from torch.nn.utils import parametrize


def _empty(cls: type) -> nn.Module:
    """An instance of ``cls`` whose ``__init__`` has not run (its state comes next)."""
    return cls.__new__(cls)


def _restore(module: nn.Module, state: tuple[dict[str, Any], tuple[str, ...]]) -> None:
    """Give ``module`` its ``__dict__`` and make it parametrized again under ``names``."""
    attributes, names = state
    module.__dict__.update(attributes)
    parametrize._inject_new_class(module)  # what register_parametrization does on a first registration
    for name in names:
        parametrize._inject_property(module, name)


class Pickler(cloudpickle.Pickler):
    """``cloudpickle``'s pickler that also sends parametrized modules (module docstring)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, nn.Module) and parametrize.is_parametrized(obj):
            original_class = type(obj).__bases__[0]  # Parametrized<Class> derives from Class alone
            names = tuple(obj.parametrizations.keys())
            # state after creation: a module reached again from its own state is the same object
            return _empty, (original_class,), (dict(obj.__dict__), names), None, None, _restore
        return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
    """``obj`` pickled by :class:`Pickler` (``cloudpickle.dumps``, parametrized modules too)."""
    buffer = io.BytesIO()
    Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return buffer.getvalue()
