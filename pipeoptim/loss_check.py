"""The loss-reduction check of a split mini-batch: :class:`CheckedLoss`.

A mini-batch split into micro-batches trains on the weighted sum of their losses
(:mod:`pipeoptim.microbatch`), which is the mini-batch's loss only where ``loss_fn`` is the
reduction ``loss_reduction`` says; this checks every micro-batch's loss against two parts of it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pipeoptim.errors import PipelineError
from pipeoptim.microbatch import Reduction, note_where
from pipeoptim.storage import storage_address, storage_bytes

#: bytes of micro-batch outputs the pending checks may hold after a backward (all are checked
#: before the optimizer step); beyond it the oldest are checked at once
HELD_BYTES = 32 << 20


class CheckedLoss:
    """``loss_fn`` that verifies, on every call with at least two rows, that its value is the
    ``reduction`` of per-row values: it compares ``loss(rows)`` with ``loss`` of two parts, the
    first row and the others (``mean``: ``(n₁·l₁ + n₂·l₂)/n``; ``sum``: ``l₁ + l₂``), to
    ``rtol=1e-4``. Parts of unequal size make it unlikely that a loss normalised otherwise (by a
    token count) passes by coincidence. Where the output holds 16-bit floats or autocast is on,
    the whole and the parts are evaluated again in float32 with autocast off (the check is of
    the loss's reduction, not of its precision: bfloat16 rounding, about 4e-3, failed a true
    mean), a third evaluation; a ``loss_fn`` that itself returns a 16-bit value is compared to
    3 units of its dtype's rounding instead (``rtol`` 2.3e-2 for bfloat16, 2.9e-3 for float16:
    mean and sum still differ by a factor of the rows). Every call, not the first few: padding that a
    ``cross_entropy(..., ignore_index=-100)`` skips may first appear in a later mini-batch
    (data bucketed by length), and from there the split mini-batch trained silently wrong.
    The cost is two more evaluations of ``loss_fn``, without gradients, per micro-batch, where
    mini-batches are split at all. The check of each call waits in :attr:`pending` until
    :meth:`check_pending`, off the critical path: a pipeline's last stage runs the checks
    before its optimizer step (then it waits for the next mini-batch's activations), and after
    a backward, once the gradients are sent on, only those that would hold more than
    :data:`HELD_BYTES` of outputs (a pending check holds views of its micro-batch's output: a
    language model's logits over its vocabulary are checked at once). On the benchmark MLP the
    check, run as each loss was computed, had cost our 1F1B 2.5% of its rate; after each
    backward 1.4%, since the check of every micro-batch but the last delayed the next forward.

    The check is skipped where the model output's first tensor and the targets' first tensor do
    not share dim 0 (then dim 0 is not a batch dimension of both).

    Raises:
        PipelineError: (on :meth:`check_pending`) the loss matches the other reduction, or
            neither.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor], reduction: Reduction) -> None:
        self.loss_fn = loss_fn
        self.reduction = reduction
        #: the checks of the calls not yet checked, in call order: (bytes of the output they
        #: hold, the call's :attr:`where`, the check)
        self.pending: deque[tuple[int, Any, Callable[[], None]]] = deque()
        #: the caller's ``(mini-batch, j, rows)`` of the next call (:func:`pipeoptim.microbatch.
        #: describe`), named by its check's error
        self.where: tuple[int, int, tuple[int, ...]] | None = None
        #: who runs the checks, as a failing check's note names it (e.g. "stage 3's loss check")
        self.who = "the loss check"

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        rows = _rows(output, targets)
        if rows is None or rows < 2:
            return self.loss_fn(output, targets)
        device = _first_tensor(output).device.type  # type: ignore[union-attr]
        exact = torch.is_autocast_enabled(device) or _has_half(output)
        # detached: a pending check holding the output's graph kept the stage's input
        # activation and its gradient alive until the check ran (helper-94)
        checked = (_plain(output, exact), _plain(targets, exact))
        # cut before loss_fn runs: it may change the containers it gets (a dict output's
        # .pop("logits") works on the plain model), which hid the rows from the check
        pairs = list(zip(*(_first_and_rest(v) for v in checked)))
        loss = self.loss_fn(output, targets)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            again = checked if exact else None
            check = functools.partial(self._check_call, loss.detach(), again, device, pairs, rows)
            self.pending.append((_held_bytes(checked), self.where, check))
        return loss

    def check_pending(self, keep_bytes: int = 0, when: str = "") -> None:
        """Run the deferred checks, oldest first (each is dropped before it runs), until those
        left hold at most ``keep_bytes`` of outputs (0: all of them). A failure is noted as
        raised in :attr:`who` (``when``) of the checked call's micro-batch (:attr:`where`)."""
        held = sum(n for n, _, _ in self.pending)
        while self.pending and (held > keep_bytes or not keep_bytes):
            nbytes, where, check = self.pending.popleft()
            held -= nbytes
            try:
                check()
            except Exception as exc:
                note_where(exc, f"{self.who} ({when})" if when else self.who, where)
                raise

    def _check_call(
        self, whole: torch.Tensor, again: tuple | None, device: str, pairs: list, rows: int
    ) -> None:
        """The check of one call: ``again`` (the output and targets in float32) where the loss
        is evaluated again in float32 with autocast off, ``None`` where ``whole`` stands."""
        off = torch.autocast(device, enabled=False) if again is not None else contextlib.nullcontext()
        with torch.no_grad(), off:
            value = self.loss_fn(*again) if again is not None else whole
            self._check(float(value), pairs, rows, _rtol(value))

    def _check(self, whole: float, pairs: list[tuple[Any, Any]], rows: int, rtol: float) -> None:
        sizes = [1.0, rows - 1.0]
        if callable(self.reduction):
            sizes = [float(self.reduction(t)) for _, t in pairs]
            if min(sizes) <= 0:
                return  # a part with no unit tells nothing
        # a non-finite loss tells nothing of its reduction (nan_check reports it, unless turned
        # off); a part's may be NaN where the whole's is not (a row of padding alone): refused
        if not math.isfinite(whole):
            return
        parts = [float(self.loss_fn(o, t)) for o, t in pairs]
        as_mean = sum(n * v for n, v in zip(sizes, parts)) / sum(sizes)
        as_sum = sum(parts)
        fits = {"mean": _close(whole, as_mean, rtol), "sum": _close(whole, as_sum, rtol)}
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
                f"compiled with loss_reduction={self.reduction!r}: pass loss_reduction={other!r} "
                f"(--loss-reduction {other} on the command line)"
            )
        raise PipelineError(
            f"loss_fn of {rows} rows ({whole:.6g}) is neither the mean ({as_mean:.6g}) nor the sum "
            f"({as_sum:.6g}) of its parts' losses, so splitting mini-batches into micro-batches "
            "would change it: make it a per-row mean or sum (loss_reduction='mean' or 'sum'), or, "
            "for a mean over tokens or other units, pass loss_reduction=a function of the targets "
            "that counts them (e.g. lambda y: (y != PAD).sum())"
        )


def check_scalar_loss(loss: Any) -> None:
    """Raise unless ``loss`` (what ``loss_fn`` returned) is a real floating-point tensor of one
    element, the only loss a backward can start from: checked at the forward, so that the
    error names the loss, where a complex or integer one would fail later in autograd or in the
    finiteness check with a message about neither.

    Raises:
        PipelineError: ``loss`` is not a tensor, has more than one element, or is complex,
            integer or boolean, or, where gradients are on, needs none (a constant or a
            detached value: the backward failed with autograd's "element 0 of tensors does not
            require grad", helper-173); the message says which and the fix.
    """
    if not isinstance(loss, torch.Tensor):
        problem, fix = f"got {type(loss).__name__}", "return a tensor"
    elif loss.numel() != 1:
        problem, fix = f"got shape {tuple(loss.shape)}", "reduce it, e.g. with .mean()"
    elif loss.is_complex():
        problem, fix = f"got a {loss.dtype} tensor", "train on a real value of it, e.g. its .abs()"
    elif not loss.is_floating_point():
        problem, fix = (
            f"got a {loss.dtype} tensor",
            "compute it in floating point (no gradient flows through integers)",
        )
    elif torch.is_grad_enabled() and not loss.requires_grad:
        problem, fix = (
            "got one that needs no gradient (a constant, or computed without the model's output)",
            "compute it from the model's output, without .detach(), .item() or torch.no_grad()",
        )
    else:
        return
    raise PipelineError(f"loss_fn must return a real floating-point scalar tensor, {problem}: {fix}")


def _held_bytes(value: tuple[Any, ...]) -> int:
    """Bytes of the storages of the tensors in ``value`` (each storage once; none for a
    sparse tensor, :func:`pipeoptim.storage.storage_address`)."""
    leaves = value if all(isinstance(x, torch.Tensor) for x in value) else pytree.tree_leaves(value)
    tensors = {storage_address(x): x for x in leaves if isinstance(x, torch.Tensor)}
    return sum(storage_bytes(x) for address, x in tensors.items() if address)


def _plain(value: Any, to_float32: bool) -> Any:
    """``value`` with its tensors detached and, with ``to_float32``, its 16-bit floating ones
    in float32 (new containers)."""

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        x = x.detach()
        return x.float() if to_float32 and _is_half(x) else x

    return one(value) if isinstance(value, torch.Tensor) else pytree.tree_map(one, value)


def _is_half(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16)


def _has_half(value: Any) -> bool:
    """Whether ``value`` holds a 16-bit floating tensor."""
    if isinstance(value, torch.Tensor):  # the common case, without the tree walk (per micro-batch)
        return _is_half(value)
    return any(_is_half(x) for x in pytree.tree_leaves(value))


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


def _rtol(loss: torch.Tensor) -> float:
    """The check's relative tolerance for a loss of ``loss``'s dtype (class docstring)."""
    return 3 * torch.finfo(loss.dtype).eps if _is_half(loss) else 1e-4


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-6)
