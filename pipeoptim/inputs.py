"""Checking a mini-batch's inputs against the plan before it is split into micro-batches.

The plan was made for ``example_inputs`` (``[batch, ...]`` tensors): a mini-batch must have
as many input tensors, the same dtypes and the same shapes after dim 0 (dim 1 may be shorter
where the plan has a dynamic sequence length, :mod:`pipeoptim.compiler.shapes`), and no more
rows than planned.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from pipeoptim import microbatch
from pipeoptim.errors import PipelineError
from pipeoptim.runtime.build import PipelineSpec


def as_tuple(inputs: Any, what: str = "step()") -> tuple[torch.Tensor, ...]:
    """A tensor as a 1-tuple; a tuple or list of tensors as a tuple.

    Raises:
        PipelineError: anything else (a NumPy array, a dict, ...): iterated, an array's rows
            were taken for as many inputs.
    """
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    fix = (
        "convert it with torch.from_numpy(...) or torch.as_tensor(...)"
        if hasattr(inputs, "__array__")
        else "pass the model's positional inputs as a tensor or a tuple of tensors, in the order of "
        "example_inputs"
    )
    raise PipelineError(
        f"{what} takes the model's inputs as a tensor or a tuple or list of tensors, got "
        f"{type(inputs).__module__}.{type(inputs).__name__}: {fix}"
    )


def example_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """``compile``'s ``example_inputs`` as a tuple of dense tensors, each ``[batch, ...]``.

    Raises:
        ValueError: not a tensor, tuple or list of tensors (a dict or a nested tuple: the message
            says how to wrap the model), a tensor without a batch dimension (0-d), or a sparse
            tensor (not cut into micro-batches along dim 0).
    """
    wrap = (
        "the stages exchange tensors only: wrap the model in a module whose forward takes each tensor "
        "positionally (def forward(self, x, mask): return model({'x': x, 'mask': mask})) and pass "
        "them as a tuple in that order"
    )
    if not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise ValueError(
            f"example_inputs must be a tensor or a tuple of tensors with a batch dimension (dim 0), "
            f"got {type(example_inputs).__name__}: pass one mini-batch of the model's inputs; {wrap}"
        )
    inputs = as_tuple(example_inputs)
    if not inputs:
        raise ValueError("example_inputs is empty: pass one mini-batch of the model's inputs")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"example_inputs must be a tensor or a tuple of tensors, but input {i} is of type "
                f"{type(x).__name__}: {wrap}"
            )
        if x.dim() == 0:
            raise ValueError(
                f"example input {i} is a 0-d tensor: every input needs a batch dimension (dim 0); "
                "keep a constant on the model (a buffer) or give it one row per example"
            )
    sparse = [i for i, x in enumerate(inputs) if x.layout != torch.strided]
    if sparse:
        raise ValueError(
            f"example input {sparse[0]} is a sparse tensor ({inputs[sparse[0]].layout}), which cannot be "
            "cut into micro-batches along dim 0: pass it dense (x.to_dense()), or keep the sparse matrix "
            "on the model (a buffer) and give forward dense inputs"
        )
    return inputs


def check_batch(spec: PipelineSpec, inputs: tuple[torch.Tensor, ...]) -> microbatch.Rows:
    """Rows (and sequence length) of a training mini-batch.

    Raises:
        PipelineError: another number of tensors, a non-tensor, another dtype or shape than
            the example inputs, inputs that disagree on the batch size, or no rows.
    """
    return microbatch.Rows(_like_examples(spec, inputs, "step()"), length_of(spec, inputs))


def check_eval_batch(spec: PipelineSpec, inputs: tuple[torch.Tensor, ...]) -> microbatch.Rows:
    """Rows (and sequence length) of a batch for ``predict()`` (any number of rows).

    Raises:
        PipelineError: not shaped like the example inputs (as :func:`check_batch`), or empty.
    """
    return microbatch.Rows(_like_examples(spec, inputs, "predict()"), length_of(spec, inputs))


def _like_examples(spec: PipelineSpec, inputs: tuple[torch.Tensor, ...], what: str) -> int:
    """The batch size of ``inputs``, checked against the example inputs."""
    examples = spec.example_inputs
    if len(inputs) != len(examples):
        rows = " (a list of row tensors is one input per row: torch.stack makes one tensor)"
        raise PipelineError(
            f"{what} got {len(inputs)} input tensor(s), the model was compiled with {len(examples)}: "
            f"pass one tensor per positional input of forward, as in example_inputs"
            f"{rows if len(examples) < len(inputs) else ''}"
        )
    batch = None
    for i, (x, ex) in enumerate(zip(inputs, examples)):
        if not isinstance(x, torch.Tensor):
            raise PipelineError(f"input {i} is a {type(x).__name__}, not a tensor")
        if x.dtype != ex.dtype or not microbatch.same_shape(x, ex, i, spec.length):
            dims = [
                "length≤" + str(ex.shape[1]) if d == 0 and _varies(spec, i) else str(n)
                for d, n in enumerate(ex.shape[1:])
            ]
            scalars = (
                f" (example input {i} has one dimension, read as a batch of single values: compile with "
                f"[batch, {x.shape[-1]}] example inputs, e.g. x.unsqueeze(0), for rows of {x.shape[-1]})"
                if ex.dim() == 1 and x.dim() > 1
                else ""
            )
            raise PipelineError(
                f"input {i} has shape {tuple(x.shape)} {x.dtype}; the plan expects "
                f"[{', '.join(['batch', *dims])}] {ex.dtype}: give inputs shaped "
                f"like example_inputs, or compile again for the new shape{scalars}"
            )
        if batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise PipelineError(f"inputs disagree on the batch size ({batch} vs {x.shape[0]})")
    if not batch:
        raise PipelineError(f"{what} got an empty batch (0 rows)")
    return int(batch)


def check_rows(batch: int, batch_size: int, micro_batches: int, method: str, static_batch: bool) -> None:
    """Refuse a mini-batch of ``batch`` rows the plan (made for ``batch_size``) cannot run.

    Raises:
        PipelineError: more rows than planned; fewer rows than micro-batches under 2bw; or
            another batch size where torch.export fixed it.
    """
    if batch > batch_size:
        raise PipelineError(
            f"mini-batch of {batch} is larger than the {batch_size} the plan was made for "
            "(its memory estimate would not hold): compile with a larger example batch"
        )
    if batch < micro_batches and method == "2bw":
        raise PipelineError(
            f"mini-batch of {batch} cannot be split into {micro_batches} micro-batches, and "
            "PipeDream-2BW steps every M micro-batches: drop the last incomplete batch "
            "(DataLoader(drop_last=True))"
        )
    if batch != batch_size and static_batch:
        raise PipelineError(
            f"this model's graph runs mini-batches of exactly {batch_size} rows (torch.export "
            f"fixed the batch size) but got {batch}: drop the last incomplete batch (drop_last=True)"
        )


def check_traced_rows(bounds: tuple[int, int | None] | None, rows: dict[str, int]) -> None:
    """Refuse batches outside the sizes the traced graph is valid for
    (:attr:`pipeoptim.compiler.trace.TracedModel.batch_rows`).

    Args:
        bounds: ``(least, most)`` rows, or ``None`` (any size).
        rows: what runs, ``{description: rows}`` (``{"mini-batch": 16, "micro-batch": 4}``).

    Raises:
        PipelineError: a size outside ``bounds``: the model's forward branches on the batch
            size, so the graph would compute what the model does at another size.
    """
    if bounds is None:
        return
    least, most = bounds
    span = f"{least} or more rows" if most is None else f"{least} to {most} rows"
    for what, n in rows.items():
        if n < least or (most is not None and n > most):
            raise PipelineError(
                f"the model's forward branches on the batch size (if x.shape[0] ...): torch.export "
                f"traced the branch it takes at {span}, but a {what} has {n} rows, where the model "
                "would take another. Fix: give example inputs and batches whose every mini-batch "
                "and micro-batch is in that range, or compute the branch from a tensor "
                "(torch.where) or in a submodule (leaf_modules=[...]) so it runs as written"
            )


def _varies(spec: PipelineSpec, i: int) -> bool:
    """Whether input ``i`` has the plan's dynamic sequence length (dim 1)."""
    return spec.length is not None and microbatch.has_length(spec.example_inputs, i)


def length_of(spec: PipelineSpec, inputs: tuple[torch.Tensor, ...]) -> int | None:
    """The sequence length (dim 1) shared by the inputs that have one; ``None`` if none has.

    Raises:
        PipelineError: the inputs disagree on it.
    """
    lengths = {int(x.shape[1]) for i, x in enumerate(inputs) if _varies(spec, i)}
    if len(lengths) > 1:
        raise PipelineError(f"inputs disagree on the sequence length (dim 1: {sorted(lengths)})")
    return lengths.pop() if lengths else None


#: per leaf of a targets value: a tensor's dtype and number of dims, another value's type
Signature = tuple[Any, ...]


def targets_signature(targets: Any) -> Signature:
    """Per leaf of ``targets`` (a pytree), a tensor's ``(dtype, dims)`` or another value's type."""
    leaves = pytree.tree_leaves(targets)
    return tuple((t.dtype, t.dim()) if isinstance(t, torch.Tensor) else type(t) for t in leaves)


def split_targets(
    targets: Any, rows: int, sizes: list[microbatch.Rows], reduction: Any, first: Signature | None
) -> tuple[list[Any], list[float], Signature]:
    """The targets of a mini-batch of ``rows`` split into ``len(sizes)`` micro-batches, each
    micro-batch's loss factor, and the targets' :func:`targets_signature`.

    Raises:
        PipelineError: targets that do not split like the inputs
            (:func:`pipeoptim.microbatch.check_rows_split`), or a tensor whose dtype changed
            since ``first``, the first mini-batch's, at the same number of dims, other than
            between floating-point types (float or int32 class labels for ``cross_entropy``
            after int64 ones: they failed inside the pipeline and stopped it, the trained
            weights with it). Other changes may be meant (float32 and float64 for
            ``mse_loss``, hard labels ``[B]`` and soft ones ``[B, C]``) and are let through.
    """
    signature = targets_signature(targets)
    if targets is not None and first is not None and len(signature) == len(first):
        for j, (was, now) in enumerate(zip(first, signature)):
            tensors = isinstance(was, tuple) and isinstance(now, tuple) and was[1] == now[1]
            if tensors and was[0] != now[0] and not (was[0].is_floating_point and now[0].is_floating_point):
                raise PipelineError(
                    f"targets' tensor {j} is {now[0]} where the first mini-batch's was {was[0]} "
                    f"({was[1]} dim(s) both): give it the first's dtype (class labels are "
                    "integers: y.long()); this batch is skipped and the pipeline goes on"
                )
    microbatch.check_rows_split(targets, rows, len(sizes))
    micro_targets = microbatch.split(targets, len(sizes))
    held = None if targets is None else micro_targets  # under torchrun only the last rank's
    return micro_targets, microbatch.scales(sizes, reduction, held), signature
