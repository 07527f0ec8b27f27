"""Trace: turn an ``nn.Module`` into a ``torch.fx`` graph whose parameters are graph nodes.

The tracer goes *through* the standard ``torch.nn`` layers (Linear, Conv, LayerNorm,
Embedding, activations, ...) so that every trainable parameter is a ``get_attr`` node of the
graph. Modules whose behaviour depends on ``.train()``/``.eval()`` or that cannot be traced
stay *leaf modules*: they run their own ``forward`` as one node, but their parameters are still
passed in as ``get_attr`` nodes (through :func:`call_leaf`), so a weight policy can swap them.

Where ``torch.fx.symbolic_trace`` fails (Hugging Face ``transformers`` 5.x, for example), the
model is exported with ``torch.export.export(..., strict=False)``; its ``.module()`` is an fx
graph module with parameters as ``get_attr`` nodes too (an ATen-level graph, with the batch
and sequence dimensions dynamic where the model allows). Where that fails as well, the
submodule that broke tracing is made a leaf and tracing is retried; only a failure in the
root module's own ``forward`` is an error. A module whose ``forward`` calls a custom
``torch.autograd.Function``, switches grad mode or autocast, or reads ``self.training`` is made
a leaf first, so that it runs as written (:mod:`pipeoptim.compiler.trace_guards`).
"""

from __future__ import annotations

import inspect
import os
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from pipeoptim.compiler.export_graph import export_graph
from pipeoptim.compiler.graph_identity import graph_hash
from pipeoptim.compiler.normalise import normalise
from pipeoptim.compiler.recompute import checkpoint_calls, fold_regions, recording_checkpoints
from pipeoptim.compiler.trace_guards import (
    PlainStateChanged,
    RandomDraw,
    TrainingFlag,
    TrainingRead,
    UntraceableCall,
    guarding_traced_calls,
    training_flags,
    watching_plain_state,
)
from pipeoptim.errors import TraceError

#: Module types kept as leaves by default: their forward depends on ``self.training``
#: (dropout, batch statistics) or is not traceable by ``torch.fx`` (recurrent layers,
#: ``MultiheadAttention``'s fast paths).
DEFAULT_LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._NormBase,
    nn.RNNBase,
    nn.MultiheadAttention,
)


def is_default_leaf(module: nn.Module) -> bool:
    """Whether ``module`` is kept as a leaf unasked: one of :data:`DEFAULT_LEAF_TYPES`, or a
    module with parametrized tensors (``torch.nn.utils.parametrize``): traced through, a
    parametrization's ``self.training`` branch was fixed at trace time, so ``spectral_norm``'s
    power iteration ran in ``predict()`` too and moved its vectors, unlike the model in eval
    mode (helper-116); run whole, it follows ``.train()`` / ``.eval()``."""
    return isinstance(module, DEFAULT_LEAF_TYPES) or parametrize.is_parametrized(module)


_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(__file__))


def call_leaf(
    module: nn.Module,
    names: tuple[str, ...],
    params: tuple[torch.Tensor, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run a leaf module's own ``forward`` with its parameters given explicitly.

    ``torch.func.functional_call`` swaps the named parameters for the given tensors for the
    duration of the call; buffers (e.g. BatchNorm running statistics) stay the module's own.
    """
    return torch.func.functional_call(module, dict(zip(names, params)), args, kwargs)


@dataclass
class TracedModel:
    """A model as a normalised fx graph.

    Attributes:
        gm: graph module; ``gm(*flat_inputs)`` returns the flat tuple of model outputs.
            Parameters keep the model's qualified names.
        method: ``"fx"`` (``torch.fx`` symbolic tracing) or ``"export"`` (``torch.export``).
        input_names: placeholder names, one per example input (positional).
        out_spec: pytree spec that turns the flat outputs back into the model's output type.
        tied: qualified names of shared parameters, ``{name used in the graph: [aliases]}``.
        leaf_modules: qualified names of modules kept as one node.
        auto_leaves: leaf modules chosen automatically because tracing through them failed,
            with the reason.
        model_name: class name of the traced model.
        graph_hash: sha256 of the normalised graph and the shapes of its state; keys profiles.
        batch_rows: ``(least, most)`` rows a batch may have (``most`` ``None``: no bound) where
            torch.export narrowed them because the forward branches on the batch size; ``None``
            where any batch size runs the graph as the model (:func:`_batch_rows`).
    """

    gm: fx.GraphModule
    method: str
    input_names: list[str]
    out_spec: pytree.TreeSpec
    tied: dict[str, list[str]]
    leaf_modules: list[str]
    auto_leaves: dict[str, str] = field(default_factory=dict)
    model_name: str = ""
    graph_hash: str = ""
    batch_rows: tuple[int, int | None] | None = None

    def unflatten_output(self, flat: Sequence[Any]) -> Any:
        """Rebuild the model's output structure (tensor, tuple, dict, ModelOutput) from ``flat``."""
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def node_module(self, node: fx.Node) -> tuple[str, str]:
        """Innermost module path and class name the node was traced in (``("", "")`` at root)."""
        return node_module(node)


def node_module(node: fx.Node) -> tuple[str, str]:
    """Innermost ``(module path, module class name)`` recorded for ``node`` while tracing."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        if node.op == "get_attr":
            path = str(node.target).rpartition(".")[0]
            return path, ""
        return "", ""
    path, mtype = list(stack.values())[-1]
    name = mtype if isinstance(mtype, str) else getattr(mtype, "__name__", str(mtype))
    return str(path), name.rpartition(".")[2]


class _Tracer(fx.Tracer):
    """fx tracer that goes through ``torch.nn`` layers and turns leaves into :func:`call_leaf`.

    Buffers are proxied (``get_attr`` nodes), so a view, slice or in-place update of a buffer
    in ``forward`` (``x + self.pe[:, : x.shape[1]]``) stays a use of the buffer, not a constant
    frozen at trace time.
    """

    proxy_buffer_attributes = True

    def __init__(self, leaf_names: set[str]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.failed_module: str | None = None

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, TrainingFlag):  # F.dropout(x, p, self.training), for one
            raise TrainingRead(TrainingFlag.refusal("passes self.training to an operation"))
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False  # leaves are handled in call_module so their parameters become nodes

    def _is_leaf(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaf_names or is_default_leaf(m)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        qualname = self.path_of_module(m)
        if qualname and self._is_leaf(m, qualname):
            params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
            if params:
                forward = self._leaf_forward(m, qualname, params)
            else:
                forward = self._plain_leaf_forward(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = qualname
            raise

    def _plain_leaf_forward(self, qualname: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            return self.create_proxy("call_module", qualname, args, kwargs)

        return run

    def _leaf_forward(self, m: nn.Module, qualname: str, params: list) -> Any:
        names = tuple(n for n, _ in params)

        def run(*args: Any, **kwargs: Any) -> Any:
            module = self.create_proxy("get_attr", qualname, (), {})
            tensors = tuple(self.create_proxy("get_attr", f"{qualname}.{n}", (), {}) for n in names)
            return self.create_proxy("call_function", call_leaf, (module, names, tensors, args, kwargs), {})

        return run


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost traceback frame outside torch and pipeoptim."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not os.path.abspath(f.filename).startswith((_TORCH_DIR, _OWN_DIR))
    ]
    files = [f for f in frames if not f.filename.startswith("<")]
    for frame in reversed(files or frames):
        return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return "(no source line outside torch)"


def _plain_state_error(model: nn.Module, exc: PlainStateChanged, by: str = "") -> TraceError:
    """The refusal of ``model`` whose own forward (or, traced by torch.export, any) changes a
    plain attribute at trace time (:func:`watching_plain_state`)."""
    name = type(model).__name__
    where = f"{name} could only be traced by {by}" if by else f"{name}.forward"
    return TraceError(
        f"{where} {exc}. Fix: keep tensors that forward changes as buffers "
        "(self.register_buffer(name, tensor), persistent=False to keep one out of the state_dict), "
        "whose changes the graph records, and return what forward computes instead of storing it"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Shared parameters: ``{first qualified name: [other names of the same tensor]}``."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names[1:] for names in by_id.values() if len(names) > 1}


def _symbolic_trace(
    model: nn.Module, n_inputs: int, leaf_names: set[str], root_flag: bool = True
) -> tuple[fx.GraphModule | None, BaseException | None, str | None]:
    tracer = _Tracer(leaf_names)
    sig = inspect.signature(model.forward)
    concrete = {}
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    for p in positional[n_inputs:]:
        if p.default is inspect.Parameter.empty:
            raise TraceError(
                f"{type(model).__name__}.forward needs argument {p.name!r} but only {n_inputs} "
                "example input(s) were given: pass one example tensor per positional argument"
            )
        concrete[p.name] = p.default
    before = set(vars(model))
    try:
        with (
            watching_plain_state(model),  # first: it checks once the others are undone
            recording_checkpoints(model, tracer) as regions,
            guarding_traced_calls(),
            training_flags(model, tracer._is_leaf, root=root_flag),
        ):
            graph = tracer.trace(model, concrete_args=concrete or None)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        fold_regions(gm, regions)
        return gm, None, None
    except PlainStateChanged as exc:  # found after the trace: the module holding the tensor
        return None, exc, exc.owner
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        return None, exc, tracer.failed_module
    finally:
        # fx stores constants (``_tensor_constant0``) on the traced module itself; a later
        # trace of the same module would number them on, and its graph hash would differ.
        for name in set(vars(model)) - before:
            delattr(model, name)


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    leaf_modules: Iterable[str] = (),
) -> TracedModel:
    """Trace ``model`` into a :class:`TracedModel`.

    Args:
        model: the module to trace; it is not modified.
        example_inputs: one tensor or a sequence of tensors, the positional arguments of
            ``model.forward`` (shape ``[batch, ...]`` each; dim 0 is the batch dimension).
        leaf_modules: qualified names of extra modules to keep as one node.

    Raises:
        TraceError: neither ``torch.fx`` nor ``torch.export`` can trace the root module, or
            its own ``forward`` makes a call a traced graph would drop (a custom
            ``torch.autograd.Function``, ``no_grad``, ``autocast``); the message names
            the module, the source line and what to do.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    leaf_names = set(leaf_modules)
    known = dict(model.named_modules())
    for name in leaf_names:
        if name not in known:
            names = [n for n in known if n][:3]
            hint = (
                f"use a qualified name from model.named_modules(), e.g. {', '.join(map(repr, names))}"
                if names
                else "it has no submodules"
            )
            raise TraceError(f"leaf module {name!r} is not a submodule of {type(model).__name__}; {hint}")
    auto_leaves: dict[str, str] = {}
    gm, exc, failed = _symbolic_trace(model, len(inputs), leaf_names)
    root_training = ""  # the root's own read of self.training, traced at its value (a warning)
    while gm is None and isinstance(exc, UntraceableCall):  # the module making it runs as written
        while failed and failed in leaf_names:  # a leaf was given self.training: its caller read it
            failed = failed.rpartition(".")[0]
        if failed:
            auto_leaves[failed] = (
                str(exc)
                if isinstance(exc, (PlainStateChanged, RandomDraw))
                else f"{exc} at {_user_frame(exc)}"
            )
            leaf_names.add(failed)
        elif isinstance(exc, TrainingRead) and not root_training:
            root_training = f"{exc} at {_user_frame(exc)}"
        elif isinstance(exc, PlainStateChanged):
            raise _plain_state_error(model, exc) from exc
        else:
            where = "" if isinstance(exc, RandomDraw) else f" at {_user_frame(exc)}"
            raise TraceError(
                f"{type(model).__name__}.forward {exc}{where}. Fix: move that code into "
                "a submodule's forward (the submodule then runs as one node, as written)"
            ) from exc
        gm, exc, failed = _symbolic_trace(model, len(inputs), leaf_names, root_flag=not root_training)
    if root_training:
        warnings.warn(
            f"{type(model).__name__}.forward {root_training}: the graph keeps the training branch, so "
            "Pipeline.predict runs it too. Fix: move the code that tests self.training into a submodule",
            stacklevel=2,
        )
    method = "fx"
    if gm is None:
        assert exc is not None
        first_failure = (exc, failed)
        try:
            with watching_plain_state(model), checkpoint_calls(model) as checkpointed:
                exported = export_graph(model, inputs)
            gm = exported  # not before the watcher has found the model's plain state unchanged
            method = "export"
            if checkpointed:
                warnings.warn(
                    f"torch.export traced through torch.utils.checkpoint on {', '.join(checkpointed)}: "
                    "their activations are saved, not recomputed. Fix: make the model traceable by "
                    f"torch.fx ({_first_line(exc)} at {_user_frame(exc)}), e.g. with leaf_modules",
                    stacklevel=2,
                )
        except Exception as export_exc:
            # Make each submodule that breaks tracing a leaf and retry with fx.
            while gm is None and failed:
                auto_leaves[failed] = f"{_first_line(exc)} at {_user_frame(exc)}"
                leaf_names.add(failed)
                gm, exc, failed = _symbolic_trace(model, len(inputs), leaf_names)
            if gm is None and isinstance(export_exc, PlainStateChanged):
                raise _plain_state_error(model, export_exc, "torch.export, which") from export_exc
            if gm is None:
                fx_exc, fx_failed = first_failure
                where = fx_failed or ""
                mod = known.get(where, model)
                fix = (  # a Hugging Face model returning its key/value cache (helper-156)
                    "set model.config.use_cache = False (its key/value cache is for generation: "
                    "training needs none, and neither tracer can return it)"
                    if getattr(getattr(model, "config", None), "use_cache", None) is True
                    else "remove tensor-dependent Python control flow from that forward, or move it "
                    "into a submodule and pass its name in leaf_modules=[...] so it runs as one opaque node"
                )
                raise TraceError(
                    f"cannot trace module {where or '<root>'!r} ({type(mod).__name__}) at "
                    f"{_user_frame(fx_exc)} -- {_first_line(fx_exc)}; torch.export also failed: "
                    f"{_first_line(export_exc)}. Fix: {fix}"
                ) from fx_exc
    if auto_leaves:
        warnings.warn(
            "made these modules leaves because tracing through them failed: "
            + "; ".join(f"{k} ({v})" for k, v in auto_leaves.items()),
            stacklevel=2,
        )
    batch_rows = gm.meta.pop("batch_rows", None)
    input_names, out_spec = normalise(gm, method, len(inputs))
    traced = TracedModel(
        gm=gm,
        method=method,
        input_names=input_names,
        out_spec=out_spec,
        tied=tied_parameters(model),
        leaf_modules=sorted(leaf_names),
        auto_leaves=auto_leaves,
        model_name=type(model).__name__,
        batch_rows=batch_rows,
    )
    traced.graph_hash = graph_hash(gm, leaf_names)
    return traced
