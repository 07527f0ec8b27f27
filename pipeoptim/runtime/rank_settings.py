"""Under torchrun every rank calls ``compile`` itself: its arguments must be the same on all.

Rank 0 plans and broadcasts the plan and the initial weights, but each rank checks its own
arguments and builds its own stage from them. With another learning rate on one rank the
pipeline trained silently mixed; with another method or micro-batch count gloo aborted
mid-run ("Received data size doesn't match"); an argument one rank refused (``method="bogus"``)
stopped that rank alone, and the others waited for it until the timeout. So every rank first
compares what it was given (:func:`compile_settings`, :func:`check_same_on_every_rank`): the
ranks then refuse, plan and build alike, and a step that can still fail on one rank alone
(tracing the model, building the stage) is made together (:func:`raise_together`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn

from pipeoptim import numerics
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.trace import TracedModel
from pipeoptim.errors import PeerLostError, PipelineError, first_line
from pipeoptim.runtime.optim import hyperparameters

#: differing settings named in the error; the rest are counted
SHOWN = 4
#: compile's arguments that only rank 0's planning reads (or that are this process's own):
#: they may differ between ranks
RANK_0_ONLY = (
    *("profile_dir", "memory", "bandwidth", "latency", "action_overhead", "solver", "log", "timeout"),
    *("allreduce_bandwidth", "allreduce_latency", "example_targets"),
)
_PLAIN = (int, float, str, bool, type(None))


def _model(model: Any) -> str:
    """The model's modules with their options (``repr``: Dropout's p, BatchNorm's momentum) and
    its parameters' shapes, one per line; its weights may differ (rank 0's are broadcast), and
    so may plain values its modules keep but forward never reads (a rank id): those it reads
    are in the traced graph, compared once traced (:func:`same_graph`)."""
    if not isinstance(model, nn.Module):
        return type(model).__qualname__
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:8]
    values = sum(p.numel() for p in model.parameters())
    return f"{model!r}\n{len(shapes)} parameter tensors, {values:,} values (shapes {digest})"


def _callable(fn: Any) -> str:
    """A loss function by its qualified name, a ``functools.partial`` with its arguments, a
    module (``nn.CrossEntropyLoss(label_smoothing=0.1)``) by its plain attributes."""
    if isinstance(fn, functools.partial):
        return f"partial({_callable(fn.func)}, {fn.args!r}, {fn.keywords!r})"
    if isinstance(fn, nn.Module):
        options = {
            k: v for k, v in sorted(vars(fn).items()) if isinstance(v, _PLAIN) and not k.startswith("_")
        }
        return f"{type(fn).__qualname__}({options})"
    name = getattr(fn, "__qualname__", None)
    return f"{getattr(fn, '__module__', '')}.{name}" if name else type(fn).__qualname__


def _value(value: Any) -> str:
    """An argument as comparable text: tensors by shape and dtype, a plan by its contents."""
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {value.dtype}"
    if isinstance(value, (tuple, list)):
        return ", ".join(_value(v) for v in value) if value else repr(value)
    if isinstance(value, Plan):
        return "a plan " + hashlib.sha256(repr(value.to_dict()).encode()).hexdigest()[:8]
    if callable(value):  # loss_reduction: a function by its name (its repr holds an address)
        return _callable(value)
    return repr(value) if isinstance(value, (*_PLAIN, torch.dtype)) else str(value)


def _plan(plan: Any) -> str:
    """A plan given to ``compile`` by its contents: a file at another path (relative,
    absolute, another working directory) or a :class:`Plan` object holding the same plan is
    the same; another file behind the same path is not (helper-103: a cut one node later
    trained without a ReLU, silently)."""
    if plan is None or isinstance(plan, Plan):
        return _value(plan)
    try:
        return _value(Plan.load(plan))
    except Exception as exc:  # said by compile's own reading of it
        return f"an unreadable plan file ({type(exc).__name__})"


def compile_settings(arguments: Mapping[str, Any]) -> dict[str, str]:
    """``compile``'s ``arguments`` (its parameters by name) as comparable text, but
    :data:`RANK_0_ONLY`: the model (:func:`_model`), the optimizer's class, state and every
    param group's hyperparameters, the example inputs' shapes and dtypes, the loss function
    (:func:`_callable`), every option and this process's torch settings
    (:mod:`pipeoptim.numerics`: ``torch setting cuda.matmul.fp32_precision``, ...), in
    that order."""
    settings = {"model": _model(arguments["model"])}
    optimizer = arguments["optimizer"]
    settings["optimizer"] = type(optimizer).__qualname__
    if isinstance(optimizer, torch.optim.Optimizer):
        settings["param groups"] = str(len(optimizer.param_groups))
        settings["optimizer state"] = "held (it has stepped)" if optimizer.state else "empty"
        for i, group in enumerate(hyperparameters(optimizer)):
            settings.update({f"{key} of param group {i}": repr(value) for key, value in group.items()})
    settings["example inputs"] = _value(arguments["example_inputs"])
    settings["loss_fn"] = _callable(arguments["loss_fn"])
    settings["plan"] = _plan(arguments.get("plan"))
    rest = (k for k in arguments if k not in settings and k not in ("optimizer", "example_inputs", "loss_fn"))
    settings.update({name: _value(arguments[name]) for name in rest if name not in RANK_0_ONLY})
    settings.update({f"torch setting {name}": repr(value) for name, value in numerics.compared().items()})
    return settings


def check_same_on_every_rank(settings: Mapping[str, str]) -> None:
    """Gather every rank's :func:`compile_settings` and compare them with rank 0's (a
    collective: every rank calls it, within the process group's timeout).

    Raises:
        PeerLostError: a rank did not take part within the timeout.
        PipelineError: on every rank, where any rank's settings differ from rank 0's; the
            message names up to :data:`SHOWN` of them (rank 0's order) with each rank's
            value (of a value of several lines, the first line that differs).
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, dict(settings))
    except RuntimeError as exc:  # gloo's bare timeout (a rank compiled a pipeline the others did not)
        raise PeerLostError(
            f"rank {dist.get_rank()}: comparing compile's settings with the other ranks failed "
            f"({first_line(exc)}): under torchrun every rank compiles the same pipelines, in the "
            "same order, or a rank has stopped"
        ) from exc
    first = gathered[0]
    keys = list(first) + [k for theirs in gathered for k in theirs if k not in first]
    differing = [k for k in dict.fromkeys(keys) if any(theirs.get(k) != first.get(k) for theirs in gathered)]
    if not differing:
        return
    said = []
    for key in differing[:SHOWN]:
        values: dict[str, list[int]] = {}
        other = next(theirs.get(key) for theirs in gathered if theirs.get(key) != first.get(key))
        for rank, theirs in enumerate(gathered):
            reference = other if theirs.get(key) == first.get(key) else first.get(key)
            values.setdefault(_shown(theirs.get(key), reference), []).append(rank)
        said.append(f"{key}: " + "; ".join(f"{value} on {_ranks(r)}" for value, r in values.items()))
    more = f" (and {len(differing) - SHOWN} more)" if len(differing) > SHOWN else ""
    raise PipelineError(
        f"compile was called with other arguments on different ranks{more}: " + " | ".join(said) + ". Every "
        "rank builds its stage from its own call, and rank 0 plans for all: give every rank the same model, "
        "optimizer, example input shapes and options (torchrun runs the same script on each)"
    )


def _shown(value: str | None, first: str | None) -> str:
    """``value`` as said, or of several lines the first that differs from ``first`` (another
    rank's value)."""
    if value is None:
        return "(none)"
    if "\n" not in value or first is None:
        return value
    theirs, ours = value.splitlines(), first.splitlines()
    differs = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    return f"line {differs + 1} {theirs[differs].strip()!r}" if differs < len(theirs) else "(fewer lines)"


def digest(value: Any) -> str:
    """A hash of ``value`` (nested dicts, lists and tuples of tensors and plain values: a state
    dict, an optimizer state), by its structure and every tensor's dtype, shape and bytes: equal
    on two ranks exactly where they hold the same (a checkpoint loaded from the same file).
    Plain data (an optimizer's hyperparameters, hashed at every step under torchrun) is hashed
    by its ``repr``, exact for these types: the tree walk cost ~100 us a step on a cold cache."""
    if _plain(value):
        return hashlib.sha256(repr(value).encode()).hexdigest()[:12]
    leaves, spec = pytree.tree_flatten(value)
    h = hashlib.sha256(str(spec).encode())
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu()
            t = (t.to_dense() if t.layout != torch.strided else t).contiguous()
            h.update(f"{t.dtype}{list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()[:12]


def _plain(value: Any) -> bool:
    """Whether ``value`` is nested lists, tuples and string-keyed dicts of values of exactly the
    :data:`_PLAIN` types, whose ``repr`` is exact (``float``'s reads back the same)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return type(value) in _PLAIN


def raise_together(error: BaseException | None, what: str, group: Any = None) -> None:
    """Where ``what`` (a step every rank takes at once, e.g. "build its stage") failed on any
    rank, raise on every rank: ``error`` itself where it is this rank's, else a
    :class:`PipelineError` naming the first failed rank and its error (a collective over
    ``group``; ``error`` is ``None`` where this rank succeeded). Before, the others went on to
    the next collective, which then paired with the failed rank's next call.

    Raises:
        ``error``, or PipelineError: a rank failed.
    """
    gathered: list[Any] = [None] * dist.get_world_size(group)
    said = None if error is None else f"{type(error).__name__}: {first_line(error)}"
    dist.all_gather_object(gathered, said, group=group)
    failed = [(rank, text) for rank, text in enumerate(gathered) if text is not None]
    if error is not None:
        raise error
    if failed:
        rank, text = failed[0]
        raise PipelineError(f"rank {rank} could not {what} ({text}), so no rank runs this pipeline")


@contextlib.contextmanager
def together(what: str, kind: str, group: Any = None) -> Iterator[None]:
    """Under torchrun (``kind``), the block's failure on any rank raises on every rank at its
    end (:func:`raise_together`; ``what`` names the block in
    the other ranks' error), so that no rank goes on to a collective the failed one never
    joins; elsewhere the block as it is."""
    if kind != "torchrun":
        yield
        return
    try:
        yield
    except Exception as exc:
        raise_together(exc, what, group)
    raise_together(None, what, group)


def same_graph(traced: TracedModel, plan: Plan) -> TracedModel:
    """``traced``, this rank's trace of its model, where it is the graph rank 0 planned.

    Raises:
        PipelineError: another graph (other code in a forward, another activation function):
            every rank must compile the same model.
    """
    if traced.graph_hash != plan.profile_key.get("graph_hash"):
        raise PipelineError(
            f"this rank's {plan.model} traces to another graph than rank 0's, which planned for every "
            "rank (other code in a forward, other dtypes, or other parameters frozen): every rank must "
            "compile the same model"
        )
    return traced


def _ranks(ranks: list[int]) -> str:
    """``rank 3`` or ``ranks 0, 1, 2``."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
