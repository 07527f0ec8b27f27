"""Resolve a MODEL argument (``module:factory``, ``path/file.py:factory`` or a built-in name)."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pipeoptim.errors import PipelineError, first_line
from pipeoptim.examples import EXAMPLES
from pipeoptim.microbatch import check_rows_split
from pipeoptim.units import format_bytes

#: the forms a factory may return, as its errors name them
FORMS = "a model, (model, example_inputs) or (model, example_inputs, example_targets, loss_fn)"


@dataclass(frozen=True)
class LoadedModel:
    """What a MODEL's factory gave: the model and its example inputs (one micro-batch of the
    ``--gpus``-stage pipeline, ``[b, ...]`` each) and, where it returned them, the targets of
    those inputs (one row per input row) and ``loss_fn(output, targets)``, the loss a plan
    prices on its last stage (``None`` otherwise)."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    targets: Any = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None


class ModelSpecError(ValueError):
    """The MODEL argument cannot be resolved; the message says what forms are accepted."""


def _factory(spec: str):
    if spec in EXAMPLES:
        return EXAMPLES[spec]
    if ":" not in spec and spec.endswith(".py"):
        raise ModelSpecError(
            f"model file {spec!r} needs the function that builds the model: {spec}:FACTORY (e.g. {spec}:make)"
        )
    if ":" not in spec:
        raise ModelSpecError(
            f"unknown model {spec!r}: give a built-in example ({', '.join(EXAMPLES)}), "
            "module:factory or path/file.py:factory"
        )
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ModelSpecError(f"model file {where!r} does not exist")
        module_name = f"_pipeoptim_user_{path.stem}"
        folder = str(path.resolve().parent)
        if folder not in sys.path:  # its sibling modules import, as under python path/file.py
            sys.path.insert(0, folder)
        loader = importlib.util.spec_from_file_location(module_name, path)
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as exc:  # a syntax error, or the file's own code failing
            del sys.modules[module_name]
            raise ModelSpecError(f"cannot load model file {where!r}: {type(exc).__name__}: {exc}") from exc
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:  # module:factory from here, as python -c
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except Exception as exc:  # ImportError, an empty name (ValueError), the module's code failing
            raise ModelSpecError(f"cannot import module {where!r}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelSpecError(f"{where!r} has no callable {name!r}")
    return factory


def load_model(
    spec: str,
    input_shapes: Sequence[tuple[int, ...]] = (),
    input_dtypes: Sequence[torch.dtype] = (),
) -> LoadedModel:
    """Build the model named by ``spec``, its example inputs and, where its factory gives them,
    example targets and the loss.

    The factory may return :data:`FORMS`. Shapes given here replace the factory's example
    inputs (float inputs are ``randn``, integer inputs zeros, so that they are valid token
    ids), and its targets are cut or repeated to their rows (:func:`with_rows`); a factory that
    returns only a model needs them. Dtypes given without shapes cast the factory's example
    inputs (``Tensor.to``: a float cast to an integer dtype is truncated, not zeros).

    Raises:
        ModelSpecError: unknown spec, missing factory, a factory that raises (its error named),
            returns another form or a loss that cannot be called, or no example inputs.
    """
    factory = _factory(spec)
    try:
        made = factory()
    except Exception as exc:
        raise ModelSpecError(f"factory {spec} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(made, tuple) and len(made) not in (2, 4):
        raise ModelSpecError(f"factory {spec!r} returned a tuple of {len(made)} values: return {FORMS}")
    model, examples, targets, loss_fn = (
        (*made, None, None)[:4] if isinstance(made, tuple) else (made, (), None, None)
    )
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    if isinstance(made, tuple) and len(made) == 4 and not callable(loss_fn):
        raise ModelSpecError(
            f"factory {spec!r} returned a loss_fn of type {type(loss_fn).__name__}, which cannot be "
            "called: return (model, example_inputs, example_targets, loss_fn) with loss_fn(output, targets)"
        )
    if examples is None:  # as no example inputs (helper-178: a traceback)
        examples = ()
    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    examples = tuple(examples)
    if input_shapes:
        dtypes = list(input_dtypes) or [ex.dtype for ex in examples] or [torch.float32]
        if len(dtypes) == 1:
            dtypes = dtypes * len(input_shapes)
        if len(dtypes) != len(input_shapes):
            raise ModelSpecError(
                f"{len(input_shapes)} --input-shape but {len(dtypes)} --input-dtype; give one "
                "dtype for all inputs or one per input"
            )
        examples = tuple(_example(shape, dt) for shape, dt in zip(input_shapes, dtypes))
    elif input_dtypes:  # the factory's example inputs in the dtypes asked (ignored before: helper-136)
        dtypes = list(input_dtypes) * len(examples) if len(input_dtypes) == 1 else list(input_dtypes)
        if len(dtypes) != len(examples):
            raise ModelSpecError(
                f"{len(input_dtypes)} --input-dtype for the factory's {len(examples)} example inputs; "
                "give one dtype for all inputs or one per input"
            )
        examples = tuple(ex.to(dt) for ex, dt in zip(examples, dtypes))
    if not examples:
        raise ModelSpecError(
            f"factory {spec!r} returned no example inputs: pass --input-shape (e.g. 8x3x32x32) "
            "and, for integer inputs, --input-dtype int64"
        )
    if loss_fn is not None and targets is not None:
        # the rows the factory's targets go with: its example inputs', else --input-shape's
        given = made[1] if isinstance(made[1], torch.Tensor) else made[1] or examples
        leaves = [x for x in pytree.tree_leaves(given) if isinstance(x, torch.Tensor) and x.dim()]
        rows = int((leaves or examples)[0].shape[0])
        _check_target_rows(spec, targets, rows)
        targets = with_rows(targets, int(examples[0].shape[0]))
    return LoadedModel(model, examples, targets, loss_fn)


def _check_target_rows(spec: str, targets: Any, rows: int) -> None:
    """Refuse example targets that cannot go with example inputs of ``rows`` rows: cut or
    repeated with them to each layout's mini-batch, then split as ``step()`` splits them
    (:func:`pipeoptim.microbatch.check_rows_split`): every tensor one row per input row (dim
    0), dense; no list or array of a value per row.

    Raises:
        ModelSpecError: names the targets' rows or kind, and the fix.
    """
    for leaf in pytree.tree_leaves(targets):
        if isinstance(leaf, torch.Tensor) and (leaf.is_nested or leaf.layout != torch.strided):
            kind = "nested" if leaf.is_nested else str(leaf.layout).removeprefix("torch.")
            raise ModelSpecError(
                f"factory {spec!r} returned example targets holding a {kind} tensor, which partition "
                "cannot cut to each layout's rows: give dense tensors, one row per input row"
            )
        if isinstance(leaf, torch.Tensor) and leaf.dim() and int(leaf.shape[0]) != rows:
            raise ModelSpecError(
                f"factory {spec!r} returned example targets of {int(leaf.shape[0])} rows for example "
                f"inputs of {rows}: give one target row per input row (dim 0), as step() takes them"
            )
    try:
        check_rows_split(targets, rows, 2)  # a list of a value per row, which step() cannot split
    except PipelineError as exc:
        raise ModelSpecError(f"factory {spec!r}: example {first_line(exc)}") from exc


def with_rows(value: Any, rows: int) -> Any:
    """``value`` with every tensor of at least one dimension cut or repeated to ``rows`` rows
    (:func:`rows_of`); other leaves as they are."""
    return pytree.tree_map(
        lambda v: rows_of(v, rows) if isinstance(v, torch.Tensor) and v.dim() else v, value
    )


def rows_of(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` (``[b, ...]``) with ``rows`` rows: its first ones, or it repeated along dim 0."""
    repeats = -(-rows // x.shape[0])
    return x.repeat(repeats, *[1] * (x.dim() - 1))[:rows] if repeats > 1 else x[:rows]


def _example(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A random (floating) or zero example input of ``shape``.

    Raises:
        ModelSpecError: it cannot be allocated (a traceback from the allocator before).
    """
    try:
        return torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    except (RuntimeError, MemoryError) as exc:
        size = format_bytes(math.prod(shape) * dtype.itemsize)
        shown, why = "x".join(map(str, shape)), first_line(exc)[:120]
        raise ModelSpecError(
            f"example input {shown} ({size} of {dtype}) cannot be allocated here ({why}): give a "
            "smaller --input-shape"
        ) from exc
