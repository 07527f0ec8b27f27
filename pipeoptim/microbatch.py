"""Splitting a mini-batch into micro-batches, and how their losses add up to its loss.

A mini-batch of B rows is split along dim 0 into ``min(M, B)`` micro-batches
(``torch.tensor_split``: sizes differ by at most one), so a last mini-batch smaller than M
runs with fewer micro-batches instead of being refused.

The loss of the mini-batch is ``Σ_j scale_j · loss_j`` over its micro-batches, and the
backward of micro-batch j differentiates ``scale_j · loss_j`` (gradient accumulation,
Huang et al., GPipe, NeurIPS 2019, §2.2):

- ``loss_reduction="mean"``: ``loss_fn`` returns the mean over the rows it gets; then
  ``scale_j = n_j / B`` and the sum is the mean over the whole mini-batch.
- ``loss_reduction="sum"``: ``loss_fn`` returns the sum over its rows; ``scale_j = 1``.
- ``loss_reduction=count`` (a function of the targets): ``loss_fn`` returns the mean over the
  units ``count(targets)`` counts, e.g. the non-padding tokens of a cross-entropy with
  ``ignore_index``; then ``scale_j = c_j / Σ c`` with ``c_j = count(targets_j)``, and the sum is
  the mean over all the units of the mini-batch.

A loss that is none of these (normalised by a statistic of the batch) would change with the
micro-batch split: :class:`pipeoptim.loss_check.CheckedLoss` compares the loss of a
micro-batch with the losses of two parts of it and refuses such a loss, or a reduction
declared wrongly, with a :class:`~pipeoptim.errors.PipelineError`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pipeoptim.compiler.shapes import sequence_inputs
from pipeoptim.errors import PipelineError, ProfileError

REDUCTIONS = ("mean", "sum")
#: ``"mean"``, ``"sum"``, or ``count(targets) -> number of units the loss averages over``
Reduction = str | Callable[[Any], Any]


def split(value: Any, parts: int) -> list[Any]:
    """Split every tensor of ``value`` along dim 0 into ``parts`` (``torch.tensor_split``, views);
    other leaves, and 0-dim tensors (scalars), are repeated in every part; ``parts == 1``
    returns ``[value]`` as it is.

    :meth:`pipeoptim.pipeline.Pipeline.step` copies each part as the transport delivers it
    (:func:`pipeoptim.runtime.delivery.delivered`): a micro-batch that autograd saves (the input
    of a first convolution) then holds its own rows, not the storage of the whole mini-batch.
    """
    if parts == 1:
        return [value]
    if isinstance(value, torch.Tensor) and value.dim():  # the common cases, without a tree walk
        return list(torch.tensor_split(value, parts))
    if type(value) is tuple and value and all(isinstance(x, torch.Tensor) and x.dim() for x in value):
        return list(zip(*(torch.tensor_split(x, parts) for x in value)))
    leaves, spec = pytree.tree_flatten(value)
    pieces = [
        list(torch.tensor_split(x, parts)) if isinstance(x, torch.Tensor) and x.dim() else [x] * parts
        for x in leaves
    ]
    return [pytree.tree_unflatten([p[j] for p in pieces], spec) for j in range(parts)]


def join(pieces: list[Any], size: int, batch_dim: int | None = 0) -> Any:
    """One flat output value of ``predict()`` from its value in each piece of ``size`` rows:
    a tensor concatenated along its ``batch_dim`` (the profile's: the dimension that grew with
    the batch; ``None``: none did), a value equal in every piece (a constant) as it is.

    Raises:
        PipelineError: a value the pieces cannot be joined into (a 0-dim tensor, a statistic
            of the batch such as ``h.mean(0)``, a dataclass, any object without a batch
            dimension that differs between pieces): it was taken from the first piece alone.
    """
    first = pieces[0]
    if len(pieces) == 1:
        return first
    if isinstance(first, torch.Tensor) and batch_dim is not None and first.dim() > batch_dim:
        return torch.cat(pieces, dim=batch_dim)
    if all(_equal(p, first) for p in pieces[1:]):
        return first
    kind = (
        "not a tensor with a batch dimension"
        if not isinstance(first, torch.Tensor)
        else "a 0-dim tensor"
        if first.dim() == 0
        else "a tensor without a batch dimension, e.g. a statistic of the batch"
    )
    raise PipelineError(
        f"predict() runs its rows in pieces of {size} (a training micro-batch) and cannot join "
        f"an output of type {type(first).__name__} ({kind}) that differs between them: give "
        f"predict() at most {size} rows, or return a tensor, "
        "tuple, list or dict of tensors with a batch dimension (torch.utils._pytree.register_dataclass "
        "makes a dataclass one)"
    )


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # objects holding tensors compare ambiguously
        return False


def check_rows_split(targets: Any, rows: int, parts: int) -> None:
    """Refuse targets that :func:`split` would not split like the inputs, where a mini-batch of
    ``rows`` is split into ``parts`` > 1 micro-batches: every tensor of one or more dims is
    split along dim 0 and every other leaf is repeated whole, so

    - a list or tuple of ``rows`` plain values (numbers, strings, lists of them), or an array of
      ``rows`` (NumPy), reached every micro-batch whole (a loss that checks sizes failed on it,
      one that does not was silently wrong);
    - a tensor whose dim 0 is not the rows (a class-weight vector, labels flattened to
      ``[rows * length]``) was cut into pieces that are not the micro-batches' (a flattened
      one only where the rows divide evenly);
    - a sparse tensor cannot be split into views.

    A tensor whose dim 0 happens to equal the rows is split, whatever it holds: targets' tensors
    are per-row by definition (constants go to ``loss_fn`` through ``functools.partial``).

    Raises:
        PipelineError: names where the value sits and the fix.
    """
    if parts < 2:
        return

    def refuse(where: str, what: str, fix: str) -> None:
        raise PipelineError(
            f"targets{where} is {what}, which cannot be split into {parts} micro-batches like the "
            f"{rows} rows of the inputs: {fix}"
        )

    def plain(value: Any) -> bool:  # a number, a string, or a list of them
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return not isinstance(value, (torch.Tensor, dict))

    def per_row(value: Any) -> bool:  # a tensor that is one row's, not rows of it
        return isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != rows)

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                refuse(where, f"a sparse tensor ({value.layout})", "give it dense (.to_dense())")
            if value.dim() and value.shape[0] != rows:
                refuse(
                    where,
                    f"a tensor of shape {list(value.shape)}, {value.shape[0]} along dim 0 where the inputs "
                    f"have {rows} rows",
                    f"give one target row per input row along dim 0 (reshape flattened targets to "
                    f"[{rows}, ...] and flatten them in loss_fn), or {_CONSTANT}",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            kind = type(value).__name__
            if len(value) == rows and plain(value):
                refuse(where, f"a {kind} of {rows} values, one per row", _AS_TENSOR)
            if len(value) == rows and all(per_row(v) for v in value):
                refuse(where, f"a {kind} of {rows} tensors, one per row", _STACK)
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        elif isinstance(getattr(value, "shape", None), tuple) and value.shape and value.shape[0] == rows:
            refuse(where, f"an array of shape {list(value.shape)} ({type(value).__name__})", _AS_TENSOR)

    walk(targets, "")


_CONSTANT = "pass values that are not per row to loss_fn another way (functools.partial(loss_fn, ...))"
_STACK = f"stack them into one tensor of rows (torch.stack, padding unequal lengths), or {_CONSTANT}"
_AS_TENSOR = f"give per-row values as a tensor (torch.as_tensor(...); strings as ids first), or {_CONSTANT}"


def count(batch: int, micro_batches: int) -> int:
    """Micro-batches a mini-batch of ``batch`` rows runs as: ``min(M, batch)``."""
    return max(1, min(micro_batches, batch))


class Rows(int):
    """Rows of a micro-batch (an ``int``) with its sequence length ``length`` (dim 1 of the
    inputs; ``None`` where the plan's lengths are fixed): what a stage needs to allocate the
    buffers it receives into (:func:`pipeoptim.runtime.layout.shape_for`)."""

    length: int | None

    def __new__(cls, rows: int, length: int | None = None) -> Rows:
        obj = super().__new__(cls, rows)
        obj.length = length
        return obj

    def __reduce__(self) -> tuple:
        return (Rows, (int(self), self.length))

    def __repr__(self) -> str:
        return f"Rows({int(self)}, length={self.length})"

    def __str__(self) -> str:
        """The number of rows alone, as messages print it (``f"{rows}"``)."""
        return str(int(self))


def has_length(examples: Sequence[torch.Tensor], i: int) -> bool:
    """Whether example input ``i`` has the sequence dimension (dim 1 as long as the first's)."""
    mask = sequence_inputs(examples)
    return bool(mask and mask[i])


def same_shape(x: torch.Tensor, example: torch.Tensor, i: int, length: int | None) -> bool:
    """``x`` is shaped like example input ``i`` but for the batch and, where the plan has a
    dynamic sequence ``length`` (the longest, that of the example), a dim 1 up to it."""
    if x.dim() != example.dim() or tuple(x.shape[2:]) != tuple(example.shape[2:]):
        return False
    if x.dim() < 2 or x.shape[1] == example.shape[1]:
        return True
    return length is not None and example.shape[1] == length and 1 <= x.shape[1] <= length


def describe(mini_batch: int, j: int, rows: Sequence[int]) -> str:
    """`` of micro-batch j of mini-batch i: r of its n rows, split a/b/c into M micro-batches``
    (the split left out where there is one micro-batch). A 1-row micro-batch can fail where its
    mini-batch would not (BatchNorm in training), so errors name it."""
    text = f" of micro-batch {j} of mini-batch {mini_batch}"
    if len(rows) > 1:
        split = "/".join(map(str, rows))
        text += f": {rows[j]} of its {sum(rows)} rows, split {split} into {len(rows)} micro-batches"
    return text


def note_where(exc: BaseException, action: str, where: tuple[int, int, Sequence[int]] | None) -> None:
    """Note on ``exc`` (Python 3.11 notes; none before) ``raised in <action>`` and, where
    known, the micro-batch it raised for (:func:`describe`)."""
    if hasattr(exc, "add_note"):
        exc.add_note(f"raised in {action}{'' if where is None else describe(*where)}")


@contextlib.contextmanager
def profiled_rows(example: torch.Tensor, micro: torch.Tensor) -> Iterator[None]:
    """Profiling ``micro`` inside: a :class:`ProfileError` raised there says which rows of the
    ``example`` the user gave it ran on (``the model is profiled on one micro-batch, (4,): the
    first 4 of the 8 rows of the example inputs' (8,) along dimension 0, the batch dimension``),
    where those differ; an error naming the shape of ``micro`` named a shape the user never
    gave (helper-98).

    Raises:
        ProfileError: the one raised inside, with that note.
    """
    try:
        yield
    except ProfileError as exc:
        if micro.shape == example.shape:
            raise
        raise ProfileError(
            f"{exc} (the model is profiled on one micro-batch, {tuple(micro.shape)}: the first "
            f"{micro.shape[0]} of the {example.shape[0]} rows of the example inputs' {tuple(example.shape)} "
            "along dimension 0, the batch dimension)"
        ) from exc.__cause__


def sizes(batch: int, parts: int) -> list[int]:
    """Rows of each of the ``parts`` micro-batches :func:`split` makes of ``batch`` rows."""
    return [batch // parts + (j < batch % parts) for j in range(parts)]


def scales(sizes: list[int], reduction: Reduction, targets: list[Any] | None = None) -> list[float]:
    """Loss factor of each micro-batch of ``sizes`` rows and ``targets`` (see the module
    docstring; the targets are read only by a counting reduction).

    Raises:
        PipelineError: a counting reduction without the targets, or counting no unit.
    """
    if reduction == "sum":
        return [1.0] * len(sizes)
    if reduction == "mean":
        total = sum(sizes)
        return [n / total for n in sizes]
    if targets is None:
        raise PipelineError(
            "loss_reduction counts units in the targets, so every rank needs them: pass the targets "
            "to step() on every rank, or use loss_reduction='mean' or 'sum'"
        )
    counts = [float(reduction(t)) for t in targets]
    if sum(counts) <= 0:
        raise PipelineError(
            f"loss_reduction counted no unit in this mini-batch ({counts}): the loss has nothing to "
            "average over; skip such batches"
        )
    return [c / sum(counts) for c in counts]


def declared_reduction(loss_fn: Callable[..., Any]) -> str | None:
    """The ``reduction`` a loss states itself: an ``nn`` loss module's ``.reduction`` or the
    ``reduction=`` keyword of a ``functools.partial``; ``None`` where it does not say."""
    if isinstance(loss_fn, functools.partial):
        return loss_fn.keywords.get("reduction")
    value = getattr(loss_fn, "reduction", None)
    return value if isinstance(value, str) else None


def check_reduction(loss_fn: Callable[..., Any], reduction: Reduction) -> None:
    """Refuse an unknown ``reduction`` or one the loss contradicts.

    Raises:
        ValueError: ``reduction`` is not ``"mean"``, ``"sum"`` or a function, or the loss
            says otherwise.
    """
    if not callable(reduction) and reduction not in REDUCTIONS:
        raise ValueError(
            f"loss_reduction must be 'mean', 'sum' or a function counting the units the loss "
            f"averages over, not {reduction!r}"
        )
    stated = declared_reduction(loss_fn)
    expected = "mean" if callable(reduction) else reduction
    if stated is not None and stated != expected:
        raise ValueError(
            f"loss_fn reduces with reduction={stated!r} but loss_reduction={reduction!r}: pass "
            f"loss_reduction={stated!r} to compile (a 'none' loss must be reduced to a scalar)"
            if stated in REDUCTIONS
            else f"loss_fn reduces with reduction={stated!r}; reduce it to a scalar mean or sum"
        )
