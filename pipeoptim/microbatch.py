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
micro-batch split: :class:`CheckedLoss` compares the loss of a micro-batch with the losses of
two parts of it and refuses such a loss, or a reduction declared wrongly, with a
:class:`~pipeoptim.errors.PipelineError`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pipeoptim.compiler.shapes import sequence_inputs
from pipeoptim.errors import PipelineError

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
    leaves, spec = pytree.tree_flatten(value)
    pieces = [
        list(torch.tensor_split(x, parts)) if isinstance(x, torch.Tensor) and x.dim() else [x] * parts
        for x in leaves
    ]
    return [pytree.tree_unflatten([p[j] for p in pieces], spec) for j in range(parts)]


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
                    f"a tensor of shape {list(value.shape)} (dim 0 is not the rows)",
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
    buffers it receives into (:func:`pipeoptim.runtime.comm.shape_for`)."""

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


class CheckedLoss:
    """``loss_fn`` that verifies, on every call with at least two rows, that its value is the
    ``reduction`` of per-row values: it compares ``loss(rows)`` with ``loss`` of two parts, the
    first row and the others (``mean``: ``(n₁·l₁ + n₂·l₂)/n``; ``sum``: ``l₁ + l₂``), to
    ``rtol=1e-4``. Parts of unequal size make it unlikely that a loss normalised otherwise (by a
    token count) passes by coincidence. Where the output holds 16-bit floats or autocast is on,
    the whole and the parts are evaluated again in float32 with autocast off (the check is of
    the loss's reduction, not of its precision: bfloat16 rounding, about 4e-3, failed a true
    mean), a third evaluation. Every call, not the first few: padding that a
    ``cross_entropy(..., ignore_index=-100)`` skips may first appear in a later mini-batch
    (data bucketed by length), and from there the split mini-batch trained silently wrong.
    The cost is two more evaluations of ``loss_fn``, without gradients, per micro-batch, where
    mini-batches are split at all.

    The check is skipped where the model output's first tensor and the targets' first tensor do
    not share dim 0 (then dim 0 is not a batch dimension of both).

    Raises:
        PipelineError: (on that call) the loss matches the other reduction, or neither.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor], reduction: Reduction) -> None:
        self.loss_fn = loss_fn
        self.reduction = reduction

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        rows = _rows(output, targets)
        if rows is None or rows < 2:
            return self.loss_fn(output, targets)
        device = _first_tensor(output).device.type  # type: ignore[union-attr]
        exact = torch.is_autocast_enabled(device) or _has_half(output)
        checked = (_float32(output), _float32(targets)) if exact else (output, targets)
        # cut before loss_fn runs: it may change the containers it gets (a dict output's
        # .pop("logits") works on the plain model), which hid the rows from the check
        pairs = list(zip(*(_first_and_rest(v) for v in checked)))
        loss = self.loss_fn(output, targets)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            off = torch.autocast(device, enabled=False) if exact else contextlib.nullcontext()
            with torch.no_grad(), off:
                self._check(float(self.loss_fn(*checked)) if exact else float(loss), pairs, rows)
        return loss

    def _check(self, whole: float, pairs: list[tuple[Any, Any]], rows: int) -> None:
        sizes = [1.0, rows - 1.0]
        if callable(self.reduction):
            sizes = [float(self.reduction(t)) for _, t in pairs]
            if min(sizes) <= 0:
                return  # a part with no unit tells nothing
        parts = [float(self.loss_fn(o, t)) for o, t in pairs]
        as_mean = sum(n * v for n, v in zip(sizes, parts)) / sum(sizes)
        as_sum = sum(parts)
        fits = {"mean": _close(whole, as_mean), "sum": _close(whole, as_sum)}
        if callable(self.reduction):
            if fits["mean"]:
                return
            raise PipelineError(
                f"loss_fn of {rows} rows ({whole:.6g}) is not the mean over the units loss_reduction "
                f"counts ({as_mean:.6g} from two parts): make loss_reduction count what the loss "
                "averages over"
            )
        if fits[self.reduction]:
            return
        other = "sum" if self.reduction == "mean" else "mean"
        if fits[other]:
            raise PipelineError(
                f"loss_fn returns the {other} over the rows of a micro-batch but the pipeline was "
                f"compiled with loss_reduction={self.reduction!r}: pass loss_reduction={other!r}"
            )
        raise PipelineError(
            f"loss_fn of {rows} rows ({whole:.6g}) is neither the mean ({as_mean:.6g}) nor the sum "
            f"({as_sum:.6g}) of its parts' losses, so splitting mini-batches into micro-batches "
            "would change it: make it a per-row mean or sum (loss_reduction='mean' or 'sum'), or, "
            "for a mean over tokens or other units, pass loss_reduction=a function of the targets "
            "that counts them (e.g. lambda y: (y != PAD).sum())"
        )


def _is_half(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16)


def _has_half(value: Any) -> bool:
    """Whether ``value`` holds a 16-bit floating tensor."""
    if isinstance(value, torch.Tensor):  # the common case, without the tree walk (per micro-batch)
        return _is_half(value)
    return any(_is_half(x) for x in pytree.tree_leaves(value))


def _float32(value: Any) -> Any:
    """``value`` with its 16-bit floating tensors in float32 (new containers)."""
    return pytree.tree_map(lambda x: x.float() if _is_half(x) else x, value)


def _first_and_rest(value: Any) -> list[Any]:
    """``value``'s first row and its other rows (every tensor split along dim 0; other leaves
    and 0-dim tensors in both, as :func:`split` repeats them)."""
    if isinstance(value, torch.Tensor) and value.dim():  # the common case, without the tree walk
        return [value[:1], value[1:]]
    leaves, spec = pytree.tree_flatten(value)
    parts = [
        torch.tensor_split(x, [1]) if isinstance(x, torch.Tensor) and x.dim() else (x, x) for x in leaves
    ]
    return [pytree.tree_unflatten([p[j] for p in parts], spec) for j in range(2)]


def _rows(output: Any, targets: Any) -> int | None:
    """Rows of ``output`` and ``targets`` (dim 0 of the first tensor with a dimension of
    each), ``None`` where they differ or either has no such tensor."""
    firsts = [_first_tensor(v) for v in (output, targets)]
    if firsts[0] is None or firsts[1] is None or firsts[0].shape[0] != firsts[1].shape[0]:
        return None
    return int(firsts[0].shape[0])


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor leaf of ``value`` with at least one dimension."""
    if isinstance(value, torch.Tensor):  # the common case, without the tree walk
        return value if value.dim() > 0 else None
    return next((x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor) and x.dim() > 0), None)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
