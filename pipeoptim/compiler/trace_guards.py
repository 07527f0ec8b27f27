"""Calls a traced graph would drop: they stop tracing, and the module making them runs as written.

``torch.fx`` records tensor operations only, so seven kinds of call in a ``forward`` would be
lost without a word (or fail later with a bare ``KeyError``), changing what trains or what
evaluation computes:

- ``MyFunction.apply(x)`` of a custom ``torch.autograd.Function``: fx traces through it into
  the operations of its ``forward``, and autograd then differentiates those instead of the
  backward the user wrote (a straight-through estimator passed no gradient, so the layer
  before it never trained);
- ``with torch.no_grad():`` / ``torch.enable_grad()`` / ``torch.set_grad_enabled(...)`` /
  ``torch.inference_mode()``: the switch happens once, at trace time, so a frozen teacher or
  target network under ``no_grad`` received gradients and moved;
- ``with torch.autocast(...)``: likewise, its region ran in full precision;
- ``self.training``: read at trace time (``True``), so ``if self.training:`` branches and
  ``F.dropout(x, p, self.training)`` kept their training behaviour in evaluation
  (``Pipeline.predict``). While a module is traced through, its ``training`` is a
  :class:`TrainingFlag` that raises where it is tested or passed to an operation;
- ``self.m += v``, ``self.m = f(x)`` or ``w.data = w.data.clamp(...)``: an assignment of a
  computed value to a module's attribute or a tensor's ``.data``, which a graph cannot hold
  (the buffer kept its value, and profiling failed on the dropped node with ``KeyError:
  _tensor_constant0``; a weight constraint written that way was never applied);
- ``self.t.add_(1)`` where ``self.t`` is a plain tensor attribute (neither a parameter nor a
  buffer): fx holds such a tensor as a constant and runs arithmetic on it alone at trace time,
  so the change happened once instead of at every forward (helper-87 measured the loss 3.7e-3
  off after a few steps), and ``self.hist.append(y)`` left an fx Proxy in the list and never
  appended at training time. :func:`watching_plain_state` finds both after the trace (the
  version counter; a traced value in a list or dict) and puts the attributes back;
- ``h.register_hook(fn)`` on a value computed in ``forward``: the hook (a gradient reversal or
  scaling) was left out of the graph, so it never ran (helper-127: weights 2.3e-3 off plain
  training after one step);
- ``random.random()`` (or NumPy's global ``np.random``): drawn once, at trace time, so a
  stochastic-depth block skipped then was left out of the graph for good and one kept then
  always ran (helper-127). :func:`refusing_random_draws` finds the draw by the generators'
  states and puts them back.

While a model is traced with fx (:func:`guarding_traced_calls`, :func:`training_flags`), these
calls raise :class:`UntraceableCall`; the tracer then makes the module that made them a leaf
(:func:`pipeoptim.compiler.trace.trace`), whose forward runs as written at training time. torch's
own autograd Functions (reentrant checkpointing) are not stopped. Under ``torch.export``, which
records grad mode and autocast itself, only custom Functions are stopped
(:func:`refusing_custom_functions`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from pipeoptim.random_state import python_random_states, set_python_random_states


class UntraceableCall(Exception):
    """A module's forward made a call (:mod:`pipeoptim.compiler.trace_guards`) while traced."""


@contextlib.contextmanager
def refusing_custom_functions() -> Iterator[None]:
    """Within: ``apply`` of an ``autograd.Function`` subclass not defined in torch raises
    :class:`UntraceableCall` (torch's own, e.g. reentrant checkpointing, run as usual)."""
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not cls.__module__.startswith("torch."):
            raise UntraceableCall(
                f"calls the custom autograd.Function {cls.__module__}.{cls.__qualname__}, whose own "
                "backward a traced graph would replace"
            )
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.autograd.Function.apply = original  # type: ignore[method-assign]


#: tensor methods that register a gradient hook, which a traced graph would not hold
HOOK_METHODS = frozenset({"register_hook", "register_post_accumulate_grad_hook"})

_HOOK_REFUSAL = "registers a gradient hook (tensor.register_hook), which a traced graph would drop"


_RANDOM_REFUSAL = (
    "draws from Python's random module (or NumPy's np.random), which a traced graph would draw "
    "once, at tracing: draw with torch instead (torch.rand(()) < p), which the graph keeps"
)


class RandomDraw(UntraceableCall):
    """A traced forward drew from Python's or NumPy's global generator (found at its end, so
    the exception holds no line of the user's code)."""


@contextlib.contextmanager
def refusing_random_draws() -> Iterator[None]:
    """Within: a trace. Leaving without an error, raise :class:`RandomDraw` where the
    global ``random`` (or ``np.random``) generator moved; either way put it back as it was,
    so that tracing takes none of the caller's random numbers.

    Raises:
        RandomDraw: the generator moved.
    """
    before = python_random_states()
    try:
        yield
    finally:
        moved = python_random_states() != before
        if moved:
            set_python_random_states(before)
    if moved:
        raise RandomDraw(_RANDOM_REFUSAL)


@contextlib.contextmanager
def refusing_hooks_and_draws() -> Iterator[None]:
    """Within (``torch.export``, which runs ``forward`` on fake tensors): gradient hooks
    (:data:`HOOK_METHODS`) raise :class:`UntraceableCall`, and so does the end of the block
    where Python's or NumPy's global generator moved (:func:`refusing_random_draws`)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise UntraceableCall(_HOOK_REFUSAL)

    originals = {name: getattr(torch.Tensor, name) for name in HOOK_METHODS}
    with refusing_random_draws():
        for name in HOOK_METHODS:
            setattr(torch.Tensor, name, refuse)
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def guarding_traced_calls() -> Iterator[None]:
    """Within: custom autograd Functions (:func:`refusing_custom_functions`), grad-mode switches
    (``torch._C._set_grad_enabled``, behind ``no_grad``, ``enable_grad`` and
    ``set_grad_enabled``; ``torch._C._InferenceMode``, behind ``inference_mode``), autocast
    switches (``torch.set_autocast_enabled``), traced values assigned to a module's
    attribute (``nn.Module.__setattr__``), gradient hooks (:data:`HOOK_METHODS`) and, at the
    end of the module's call (``fx.Tracer.call_module``) or of the trace, a draw from Python's
    or NumPy's global generator (:func:`refusing_random_draws`) raise :class:`UntraceableCall`."""

    def grad_mode(mode: bool) -> None:
        raise UntraceableCall(
            f"switches gradients {'on' if mode else 'off'} (torch.no_grad, enable_grad or set_grad_enabled), "
            "which a traced graph would drop"
        )

    def autocast(*args: Any, **kwargs: Any) -> None:
        raise UntraceableCall("enters or leaves torch.autocast, which a traced graph would drop")

    def inference_mode(*args: Any, **kwargs: Any) -> None:
        raise UntraceableCall("enters torch.inference_mode, which a traced graph would drop")

    module_setattr, proxy_setattr = nn.Module.__setattr__, fx.Proxy.__setattr__

    def assign(module: nn.Module, name: str, value: Any) -> None:
        if any(isinstance(leaf, fx.Proxy) for leaf in pytree.tree_leaves(value)):
            fix = (
                f"change the tensor in place instead (self.{name}.add_(v), self.{name}.copy_(new))"
                if name in module._buffers  # (fx hands out buffers as Proxies while tracing)
                or name in module._parameters
                or isinstance(module.__dict__.get(name), torch.Tensor)
                else "return what forward computes instead of keeping it on the module"
            )
            raise UntraceableCall(
                f"assigns a computed value to self.{name} (self.{name} += v or self.{name} = ...), "
                f"which a traced graph would drop: {fix}"
            )
        module_setattr(module, name, value)

    def assign_data(proxy: fx.Proxy, name: str, value: Any) -> None:
        if name == "data":
            raise UntraceableCall(
                "assigns a tensor's .data (w.data = w.data.clamp(...)), which a traced graph would "
                "drop: change it in place instead (w.data.clamp_(...), w.data.copy_(new))"
            )
        proxy_setattr(proxy, name, value)

    attribute_call, tracer_call_module = fx.proxy.Attribute.__call__, fx.Tracer.call_module

    def call_attribute(attribute: fx.proxy.Attribute, *args: Any, **kwargs: Any) -> Any:
        if attribute.attr in HOOK_METHODS:  # h.register_hook(fn): fx would record a call
            raise UntraceableCall(_HOOK_REFUSAL)
        return attribute_call(attribute, *args, **kwargs)

    def call_module(tracer: fx.Tracer, *args: Any, **kwargs: Any) -> Any:
        with refusing_random_draws():  # the innermost module drawing raises first
            return tracer_call_module(tracer, *args, **kwargs)

    patched = (
        (fx.proxy.Attribute, "__call__", call_attribute),
        (fx.Tracer, "call_module", call_module),
        (torch._C, "_set_grad_enabled", grad_mode),
        (torch, "set_autocast_enabled", autocast),
        (torch._C, "_InferenceMode", inference_mode),
        (nn.Module, "__setattr__", assign),
        (fx.Proxy, "__setattr__", assign_data),
    )
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    with refusing_custom_functions(), refusing_random_draws():  # the root's own draws
        for owner, name, replacement in patched:
            setattr(owner, name, replacement)
        try:
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


class PlainStateChanged(UntraceableCall):
    """A plain attribute of ``owner`` (qualified module name) changed during tracing."""

    def __init__(self, owner: str, message: str) -> None:
        super().__init__(message)
        self.owner = owner


#: attributes every module has (``_parameters``, ``_buffers``, hooks...): not the user's state
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def plain_attributes(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Any]]:
    """``(module's qualified name, module, attribute, value)`` for every plain attribute of
    ``model`` and its submodules: neither a parameter, a buffer nor a submodule, nor one of
    the attributes every ``nn.Module`` has."""
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if name not in _MODULE_INTERNALS and not isinstance(value, nn.Module):
                yield prefix, module, name, value


def _traced_value(value: Any) -> bool:
    """A value that exists only while tracing: an fx Proxy, or torch.export's fake tensors."""
    return isinstance(value, fx.Proxy) or (
        isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, nn.Parameter)
    )


def contents(value: Any) -> Iterator[Any]:
    """``value`` and everything inside it, through lists, tuples, dicts and deques."""
    yield value
    if isinstance(value, (list, tuple, collections.deque)):
        for item in value:
            yield from contents(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from contents(item)


@contextlib.contextmanager
def watching_plain_state(model: nn.Module) -> Iterator[None]:
    """Within: a trace of ``model``. Its plain attributes (neither parameters, buffers nor
    submodules) are put back as they were when the block ends, whatever ends it: a tensor
    changed in place (its version counter moved; alone or in lists, tuples, dicts or deques,
    nested) gets its values back, a list, dict or deque its items, a number attribute its
    value. Leaving without an error, raise :class:`PlainStateChanged` (owner: the module
    holding the attribute; the first found) where a tensor was changed in place, a traced
    value was put in a container (``self.hist.append(y)``) or a number attribute changed
    (``self.n += 1``): the graph would have done it once, at tracing, or not at all. A change
    the graph records (``self.t.add_(x.mean())``, an operation on a traced value) does not
    run at trace time and is not reported. Tensors inside other objects are not looked at."""
    tensors, containers, numbers = [], [], []
    for prefix, module, name, value in plain_attributes(model):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers.append((prefix, name, module, value))
        for item in contents(value):
            if isinstance(item, (list, dict, collections.deque)):
                containers.append((prefix, name, item, copy.copy(item)))
            elif isinstance(item, torch.Tensor) and not isinstance(item, nn.Parameter):
                tensors.append((prefix, name, item, item._version, item.detach().clone()))
    try:
        yield
    finally:
        changed = [(prefix, name) for prefix, name, t, version, _ in tensors if t._version != version]
        stored = [
            (prefix, name)
            for prefix, name, value, before in containers
            if any(map(_traced_value, contents(value))) and not any(map(_traced_value, contents(before)))
        ]
        counted = [(p, n) for p, n, module, value in numbers if vars(module).get(n) != value]
        with torch.no_grad():
            for _, _, tensor, version, before in tensors:
                if tensor._version != version:
                    tensor.copy_(before)
        for _, _, value, before in reversed(containers):  # inner ones first
            value.clear()
            if isinstance(value, dict):
                value.update(before)
            else:
                value.extend(before)
        for _, name, module, value in numbers:
            vars(module)[name] = value
    if changed or stored or counted:
        prefix, name = (changed or stored or counted)[0]
        where = f"{prefix}.{name}" if prefix else name
        if changed:
            what = (
                f"changes self.{name} ({where}), a tensor attribute that is neither a parameter "
                "nor a buffer, in place: a traced graph holds such a tensor as a constant, so the "
                "change would happen once, at tracing, instead of at every forward"
            )
        elif stored:
            what = (
                f"stores a computed value in self.{name} ({where}: an append or an item "
                "assignment), which a traced graph would drop"
            )
        else:
            what = (
                f"changes the number self.{name} ({where}): a traced graph holds the value it had "
                "at tracing, so it would not change at every forward"
            )
        raise PlainStateChanged(prefix, what)


class TrainingRead(UntraceableCall):
    """A traced forward tested ``self.training`` or passed it to an operation."""


class TrainingFlag:
    """``module.training`` while fx traces through ``module``: testing it (``bool``) raises
    :class:`TrainingRead`, and so does passing it to an operation
    (:meth:`pipeoptim.compiler.trace._Tracer.create_arg`)."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def __bool__(self) -> bool:
        raise TrainingRead(self.refusal("reads self.training"))

    @staticmethod
    def refusal(what: str) -> str:
        return f"{what}, which a traced graph would fix at its value now (training)"

    def __repr__(self) -> str:
        return f"TrainingFlag({self.value})"


@contextlib.contextmanager
def training_flags(
    model: nn.Module, is_leaf: Callable[[nn.Module, str], bool], root: bool = True
) -> Iterator[None]:
    """Within: the ``training`` attribute of every module of ``model`` that is traced through
    (not a leaf by ``is_leaf(module, qualified name)``, nor inside one; the root itself only
    with ``root``) is a :class:`TrainingFlag`; restored after."""
    flagged: list[tuple[nn.Module, bool]] = []
    leaves: list[str] = []
    try:
        for name, module in model.named_modules():
            if any(name.startswith(f"{leaf}.") for leaf in leaves):
                continue
            if name and is_leaf(module, name):
                leaves.append(name)
                continue
            if name or root:
                flagged.append((module, module.training))
                module.__dict__["training"] = TrainingFlag(module.training)
        yield
    finally:
        for module, value in flagged:
            module.__dict__["training"] = value
