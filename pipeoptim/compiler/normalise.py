"""Normalising a traced graph into the form the compiler expects (:func:`normalise`): flat
inputs and output, no export guards, dropout and batch norm of exported graphs as modules that
follow ``.train()``/``.eval()`` (:class:`TrainingModeOp`), each ``get_attr`` before its first
user."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils import _pytree as pytree

from pipeoptim.errors import TraceError


def _mutable(value: Any) -> Any:
    """``value`` (the output node's argument) with fx's read-only containers, in which a node's
    arguments hold the model's dicts and lists, turned back into plain ``dict`` and ``list``:
    the model's output structure is rebuilt from the spec of this value, and a ``loss_fn`` or a
    caller of ``predict()`` that changes the dict it gets (``out.pop("logits")``) worked on the
    plain model but raised on fx's ``immutable_dict``."""
    if isinstance(value, immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    if isinstance(value, immutable_list):
        return [_mutable(v) for v in value]
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    if _builds_namedtuple(value):  # fx records Out(logits, aux) as one call: its fields are the outputs
        kwargs = {k: _mutable(v) for k, v in value.kwargs.items()}
        return value.target(*(_mutable(v) for v in value.args), **kwargs)
    return value


def _builds_namedtuple(value: Any) -> bool:
    """Whether ``value`` is a node that builds a ``collections.namedtuple`` (or
    ``typing.NamedTuple``) used by the output alone: ``predict()`` joined such an output as one
    leaf, which it cannot (helper-127)."""
    return (
        isinstance(value, fx.Node)
        and value.op == "call_function"
        and isinstance(value.target, type)
        and issubclass(value.target, tuple)
        and hasattr(value.target, "_fields")
        and all(user.op == "output" for user in value.users)
    )


def normalise(gm: fx.GraphModule, method: str, n_inputs: int) -> tuple[list[str], Any]:
    """Put the graph in the form the compiler expects.

    - flat inputs and a flat output tuple (the output structure is kept as a pytree spec);
    - no export guard calls, no asserts on specialised arguments, no unused ``get_attr``;
    - in export graphs, dropout, attention dropout and batch normalisation become calls of
      submodules that follow ``.train()`` / ``.eval()`` (:class:`TrainingModeOp`);
    - each ``get_attr`` sits right before its first user, so that a parameter and the
      operation using it are neighbours in the node order.
    """
    graph = gm.graph
    if method == "export":
        out_spec = graph._codegen.pytree_info.out_spec
        graph._codegen = fx.graph.CodeGen()
        for attr in ("_in_spec", "_out_spec"):  # the flat interface replaces them
            if hasattr(gm, attr):
                delattr(gm, attr)
    for node in list(graph.nodes):
        guard = node.op == "call_module" and node.target == "_guards_fn"
        assert_none = node.op == "call_function" and node.target is torch.fx._symbolic_trace._assert_is_none
        if guard or assert_none:
            graph.erase_node(node)
        elif _specialised_default(node):  # forward(x, temperature=2.0): the default is baked in
            condition = node.args[0]
            graph.erase_node(node)
            if isinstance(condition, fx.Node) and not condition.users:
                graph.erase_node(condition)
    if method == "export":
        rewrite_training_ops(gm)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for extra in placeholders[n_inputs:]:
        if extra.users:
            raise TraceError(f"argument {extra.target!r} is used by the graph but has no example input")
        graph.erase_node(extra)
    output = next(n for n in graph.nodes if n.op == "output")
    if method == "fx":
        flat, out_spec = pytree.tree_flatten(_mutable(output.args[0]))
        output.args = (tuple(flat),)
        for node in [n for n in graph.nodes if _builds_namedtuple(n) and not n.users]:
            graph.erase_node(node)  # its fields are the outputs now
    else:
        result = output.args[0]
        output.args = (tuple(result) if isinstance(result, (tuple, list)) else (result,),)
    _one_node_per_parameter(gm)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
        elif node.op == "get_attr" and _is_state_of_its_users(_fetch(gm, node.target)):
            # A module cannot be sent between stages, and a buffer (running statistics, a
            # positional encoding) belongs to the stage that uses it: each user gets its own
            # reference, so every stage using it holds it, saves it and loads it.
            for user in list(node.users)[1:]:
                with graph.inserting_before(user):
                    copy = graph.get_attr(node.target)
                copy.meta = dict(node.meta)
                user.replace_input_with(node, copy)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            node_first = min(node.users, key=order.__getitem__)
            node_first.prepend(node)
    for node in graph.nodes:  # drop fake tensors and the like: keep what the compiler reads
        node.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
    graph.lint()
    gm.recompile()
    return [n.name for n in graph.nodes if n.op == "placeholder"], out_spec


def _one_node_per_parameter(gm: fx.GraphModule) -> None:
    """Every use of a trainable parameter reads its first ``get_attr`` node. A parameter a leaf
    module shares with the rest of the model (``self.shared = model.a``) was read by two
    nodes, ``a.weight`` and the leaf's ``mid.shared.weight``: on two stages they became two
    parameters, trained apart (never summed as a shared parameter's copies are)."""
    first_of: dict[int, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        value = _fetch(gm, node.target)
        if isinstance(value, nn.Parameter) and value.requires_grad:
            first = first_of.setdefault(id(value), node)
            if first is not node:
                node.replace_all_uses_with(first)
                gm.graph.erase_node(node)


def _is_state_of_its_users(value: Any) -> bool:
    """Modules and non-trainable tensors (buffers, frozen parameters, constants)."""
    if isinstance(value, nn.Module):
        return True
    return isinstance(value, torch.Tensor) and not (isinstance(value, nn.Parameter) and value.requires_grad)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class TrainingModeOp(nn.Module):
    """Call an ATen operator with one argument that follows ``.train()`` / ``.eval()``.

    ``torch.export`` bakes the training flag of dropout and batch normalisation into the
    graph as a constant; this module puts the switch back: argument ``index`` becomes
    ``train_value`` in training mode and ``eval_value`` in evaluation mode.
    """

    def __init__(self, op: Any, index: int, train_value: Any, eval_value: Any) -> None:
        super().__init__()
        self.op = op
        self.index = index
        self.train_value = train_value
        self.eval_value = eval_value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args_list = list(args)
        args_list[self.index] = self.train_value if self.training else self.eval_value
        return self.op(*args_list, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.op}, arg {self.index}: train={self.train_value!r} eval={self.eval_value!r}"


def _training_op(node: fx.Node) -> tuple[str, nn.Module] | None:
    """Name and module replacing an export node whose behaviour depends on training mode."""
    aten = torch.ops.aten
    if node.op != "call_function":
        return None
    if node.target is aten.dropout.default:  # (input, p, train): in the mode the model was traced in
        return "dropout", nn.Dropout(float(node.args[1])).train(bool(node.args[2]))
    if node.target is aten.scaled_dot_product_attention.default:
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        if p and len(node.args) > 4:
            return "attention", TrainingModeOp(node.target, 4, float(p), 0.0)
    if node.target is aten.batch_norm.default and node.args[3] is not None:
        return "batch_norm", TrainingModeOp(node.target, 5, True, False).train(bool(node.args[5]))
    return None


def rewrite_training_ops(gm: fx.GraphModule) -> None:
    """Give export graphs their train/eval switch back (see :class:`TrainingModeOp`)."""
    counts: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        found = _training_op(node)
        if found is None:
            continue
        kind, module = found
        name = f"{kind}_{counts.get(kind, 0)}"
        counts[kind] = counts.get(kind, 0) + 1
        gm.add_submodule(name, module)
        args = node.args[:1] if kind == "dropout" else node.args
        kwargs = {} if kind == "dropout" else node.kwargs
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _specialised_default(node: fx.Node) -> bool:
    """fx's guard that a non-tensor argument left at its default (``concrete_args``) keeps it:
    ``torch._assert(arg == default, "... has been specialized to have value ...")``. The
    argument is never given (only the example tensors are), so the guard only kept a
    placeholder alive that no stage can feed."""
    return (
        node.op == "call_function"
        and node.target is torch._assert
        and len(node.args) > 1
        and isinstance(node.args[1], str)
        and "has been specialized to have value" in node.args[1]
    )
