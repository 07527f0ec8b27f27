"""Keep a user's activation checkpointing through tracing: checkpointed regions are recomputed.

``torch.fx`` traces straight through ``torch.utils.checkpoint.checkpoint`` (its Python code
just calls the function), so the graph would save every activation of the region and the
memory saving the user asked for would be lost without a word. While tracing,
:func:`recording_checkpoints` replaces ``checkpoint`` by a recorder: the function is still
traced (its nodes land in the graph), and the nodes it made are remembered as a region.
:func:`fold_regions` then moves each region into one node, a call of a
:class:`CheckpointRegion` module, whose inputs are every value the region reads from outside
(parameters and buffers included, as ``get_attr`` nodes of the outer graph, so weight
policies still see and swap them) and which runs the region's graph with recomputation:
its forward saves only its inputs, its backward recomputes the forward first (Chen et al.,
"Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174). The profile then
measures such a node as it runs: saved bytes = its inputs, backward time = recomputation +
backward.

A region runs as :class:`_Recompute`, whatever ``use_reentrant`` the user passed (gradients
are the same): its inputs, the weights included, pass through the runtime's saved-tensor
hooks like any tensor autograd saves, so its backward -- recomputation included -- uses the
weights the method gives the backward (:class:`_Recompute`). Hence with weight stashing
(``pipedream``, ``2bw``) and the synchronous methods training is the same with or without
checkpointing; with ``pipeoptim`` (and ``spectrain``, ``none``) the recomputed activations of
a region come from the backward's weights W rather than the forward's prediction Ŵ (keeping
Ŵ for the recomputation would cost one weight copy per micro-batch in flight, the stash
PipeOptim avoids). ``preserve_rng_state`` is honoured (dropout inside a region draws the same
mask when recomputed); ``context_fn`` (selective checkpointing) is not: the whole region is
recomputed. As with ``torch.utils.checkpoint``, a BatchNorm inside a region updates its
running statistics again when recomputed.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from pipeoptim.random_state import python_random_states, set_python_random_states

#: The function being replaced while tracing (kept before any patching).
_CHECKPOINT = torch_checkpoint.checkpoint


def call_module_value(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)``: a leaf module called inside a region, given as an input."""
    return module(*args, **kwargs)


class CheckpointRegion(nn.Module):
    """Runs ``body`` (a stateless graph of a checkpointed region) with recomputation.

    ``forward(*inputs)`` returns what ``body(*inputs)`` returns; autograd keeps only
    ``inputs`` (no activation inside the region) and the backward runs ``body`` again first.
    """

    def __init__(self, body: fx.GraphModule, preserve_rng_state: bool = True) -> None:
        super().__init__()
        self.body = body
        self.preserve_rng_state = preserve_rng_state
        output = next(n for n in reversed(body.graph.nodes) if n.op == "output")
        self.single = not isinstance(output.args[0], tuple)

    def forward(self, *inputs: Any) -> Any:
        if not torch.is_grad_enabled():  # inference (predict): nothing to save or recompute
            return self.body(*inputs)
        result = _Recompute.apply(self, *inputs)
        return result[0] if self.single else result


class _Recompute(torch.autograd.Function):
    """Forward without saving activations; backward recomputes the region, then differentiates.

    The inputs go through the saved-tensor hooks active at the forward, as tensors autograd
    saves do: under a runtime weight policy a weight is kept as a reference and the backward
    gets the weight the method gives the backward (the current W for PipeOptim and ``none``,
    the stashed version for PipeDream and 2BW, SpecTrain's backward prediction). The region's
    forward is recomputed with those weights, with the forward's RNG states (torch's, and
    Python's and NumPy's global generators') and autocast settings, then differentiated.
    """

    @staticmethod
    def forward(ctx: Any, region: CheckpointRegion, *inputs: Any) -> tuple[Any, ...]:
        ctx.region = region
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        ctx.unpack = hooks[1] if hooks else None
        ctx.packed = [hooks[0](t) if hooks and isinstance(t, torch.Tensor) else t for t in inputs]
        ctx.needs = [isinstance(t, torch.Tensor) and t.requires_grad for t in inputs]
        device = next((t.device for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda), None)
        ctx.cuda = [device] if device is not None else []
        ctx.rng = ctx.python_rng = None
        if region.preserve_rng_state:
            ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.cuda])
            # a leaf drawing from Python's random (stochastic depth) redraws alike (helper-131)
            ctx.python_rng = python_random_states()
        kind = "cuda" if ctx.cuda else "cpu"
        ctx.autocast = {
            "device_type": kind,
            "enabled": torch.is_autocast_enabled(kind),
            "dtype": torch.get_autocast_dtype(kind),
            "cache_enabled": torch.is_autocast_cache_enabled(),
        }
        with torch.no_grad():
            out = region.body(*inputs)
        return tuple(out) if isinstance(out, tuple) else (out,)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        unpacked = [ctx.unpack(t) if ctx.unpack is not None else t for t in ctx.packed]
        ctx.packed = []
        inputs = [
            t.detach().requires_grad_(need) if isinstance(t, torch.Tensor) else t
            for t, need in zip(unpacked, ctx.needs)
        ]
        caller = python_random_states() if ctx.python_rng is not None else None
        with torch.random.fork_rng(devices=ctx.cuda, enabled=ctx.rng is not None):
            if ctx.rng is not None:
                torch.set_rng_state(ctx.rng[0])
                for d, state in zip(ctx.cuda, ctx.rng[1]):
                    torch.cuda.set_rng_state(state, d)
                set_python_random_states(ctx.python_rng)
            try:
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    out = ctx.region.body(*inputs)
            finally:
                if caller is not None:
                    set_python_random_states(caller)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g)
            for o, g in zip(outs, grads)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *(t.grad if need else None for t, need in zip(inputs, ctx.needs)))


@dataclass
class _Region:
    nodes: list[fx.Node]
    preserve_rng_state: bool


@dataclass
class _Recorder:
    regions: list[_Region] = field(default_factory=list)
    depth: int = 0


def _is_proxy(value: Any) -> bool:
    return isinstance(value, fx.Proxy)


@contextlib.contextmanager
def recording_checkpoints(model: nn.Module, tracer: fx.Tracer) -> Iterator[list[_Region]]:
    """While tracing ``model`` with ``tracer``, record each outermost ``checkpoint`` call as a region.

    ``torch.utils.checkpoint.checkpoint`` is replaced (:func:`_checkpoint_replaced`); calls
    on real tensors (not proxies) still run the real function.
    Yields the list the regions are appended to, for :func:`fold_regions`.
    """
    recorder = _Recorder()

    def checkpoint(function: Any, *args: Any, use_reentrant: bool | None = None, **kwargs: Any) -> Any:
        options = {
            k: kwargs.pop(k)
            for k in ("context_fn", "determinism_check", "debug", "early_stop")
            if k in kwargs
        }
        preserve = kwargs.pop("preserve_rng_state", True)
        if not any(_is_proxy(a) for a in (*args, *kwargs.values())):
            return _CHECKPOINT(
                function, *args, use_reentrant=use_reentrant, preserve_rng_state=preserve, **options, **kwargs
            )
        graph = tracer.graph
        before = set(graph.nodes)
        recorder.depth += 1
        try:
            out = function(*args, **kwargs)
        finally:
            recorder.depth -= 1
        if recorder.depth == 0:
            made = [n for n in graph.nodes if n not in before]
            if made:
                recorder.regions.append(_Region(made, bool(preserve)))
        return out

    with _checkpoint_replaced(model, checkpoint):
        yield recorder.regions


@contextlib.contextmanager
def checkpoint_calls(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, record what ``torch.utils.checkpoint.checkpoint`` is called on in
    ``model``'s forwards (module names, else function names); the calls run as usual.

    ``torch.export`` traces through checkpointing like ``torch.fx`` does, so a model that only
    ``torch.export`` can trace loses its recomputation: :func:`pipeoptim.compiler.trace.trace`
    uses this to say so.
    """
    names = {id(m): name or "<root>" for name, m in model.named_modules()}
    called: list[str] = []

    def checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(function, "__self__", function)
        name = names.get(id(owner)) or getattr(function, "__qualname__", repr(function))
        if name not in called:
            called.append(name)
        return _CHECKPOINT(function, *args, **kwargs)

    with _checkpoint_replaced(model, checkpoint):
        yield called


@contextlib.contextmanager
def _checkpoint_replaced(model: nn.Module, replacement: Any) -> Iterator[None]:
    """``torch.utils.checkpoint.checkpoint`` replaced in its module and wherever a forward of
    ``model``'s modules sees it as a global (``from torch.utils.checkpoint import checkpoint``)."""
    patched: list[tuple[dict[str, Any], str]] = []
    namespaces = [vars(torch_checkpoint)]
    for module in model.modules():
        forward = getattr(type(module).forward, "__globals__", None)
        if forward is not None and all(forward is not ns for ns in namespaces):
            namespaces.append(forward)
    for ns in namespaces:
        for name, value in list(ns.items()):
            if value is _CHECKPOINT:
                ns[name] = replacement
                patched.append((ns, name))
    try:
        yield
    finally:
        for ns, name in patched:
            ns[name] = _CHECKPOINT


def fold_regions(gm: fx.GraphModule, regions: list[_Region]) -> list[str]:
    """Replace each recorded region of ``gm``'s graph by one :class:`CheckpointRegion` call.

    Returns the names of the new region nodes (``checkpoint_0``, ...), in graph order.
    """
    graph = gm.graph
    names = []
    for i, region in enumerate(regions):
        name = f"checkpoint_{i}"
        _fold(gm, region, name)
        names.append(name)
    graph.lint()
    gm.recompile()
    return names


def _fold(gm: fx.GraphModule, region: _Region, name: str) -> None:
    graph = gm.graph
    inside = [n for n in region.nodes if n.op not in ("get_attr", "placeholder", "output")]
    members = set(inside)
    for node in list(inside):  # a leaf module without trainable parameters: make it an input
        if node.op == "call_module":
            with graph.inserting_before(node):
                module = graph.get_attr(str(node.target))
                call = graph.call_function(call_module_value, (module, *node.args), dict(node.kwargs))
            call.meta = dict(node.meta)
            module.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            members.discard(node)
            members.add(call)
    order = {n: i for i, n in enumerate(graph.nodes)}
    inside = sorted(members, key=order.__getitem__)
    inputs: list[fx.Node] = []
    for node in inside:
        for arg in node.all_input_nodes:
            if arg not in members and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in inside if any(u not in members for u in n.users)]
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: body.placeholder(f"in_{n.name}") for n in inputs}
    for node in inside:
        env[node] = body.node_copy(node, lambda n: env[n])
    body.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[n] for n in outputs))
    body.lint()
    gm.add_submodule(
        name, CheckpointRegion(fx.GraphModule(nn.Module(), body, "Region"), region.preserve_rng_state)
    )
    last = inside[-1]
    with graph.inserting_after(last):
        call = graph.call_module(name, tuple(inputs))
    call.meta = {"nn_module_stack": _common_stack(inside)}
    if len(outputs) == 1:
        outputs[0].replace_all_uses_with(call, delete_user_cb=lambda u: u not in members and u is not call)
    else:
        anchor = call
        for j, out in enumerate(outputs):
            with graph.inserting_after(anchor):
                item = graph.call_function(operator.getitem, (call, j))
            item.meta = dict(call.meta)
            out.replace_all_uses_with(
                item, delete_user_cb=lambda u, item=item: u not in members and u is not item
            )
            anchor = item
    for node in reversed(inside):
        graph.erase_node(node)


def _common_stack(nodes: list[fx.Node]) -> dict[str, Any]:
    """The ``nn_module_stack`` entries every node shares (the region's enclosing modules)."""
    stacks = [list(n.meta.get("nn_module_stack", {}).items()) for n in nodes]
    common = stacks[0]
    for stack in stacks[1:]:
        size = 0
        while size < min(len(common), len(stack)) and common[size] == stack[size]:
            size += 1
        common = common[:size]
    return dict(common)
