"""A batch one process refuses is refused by all of them (torchrun: rank 0 holds the inputs,
the last rank the targets), so that the ranks stay in step or stop together at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pipeoptim import microbatch
from pipeoptim.errors import BatchRefusedError, PipelineError, RanksInOtherCallsError
from pipeoptim.runtime.launch import Executor

T = TypeVar("T")


def shared_rows(
    executor: Executor,
    inputs: Any,
    check: Callable[[Any], microbatch.Rows],
    what: str,
    kind: str,
    on_error: Callable[[BaseException], None],
    settings: object = None,
) -> microbatch.Rows:
    """Rows (and sequence length) of the batch given to ``what`` (step, predict), ``inputs``
    checked by ``check``; under torchrun rank 0's, as the other ranks may have been given no
    inputs. Inputs rank 0 refuses are refused on every rank (they wait for its rows), so that
    all skip the batch and stay in step; a rank whose own inputs disagree with rank 0's, or
    rank 0 given none, stops its pipeline as :func:`prepared_here` does; so does a rank whose
    ``settings`` (the step's optimizer hyperparameters) are not rank 0's.

    Raises:
        PipelineError: ``check``'s refusal (on every rank: ``BatchRefusedError`` on the others),
            or inputs missing or disagreeing.
    """
    refused, batch = None, None
    try:
        batch = None if inputs is None else check(inputs)
    except PipelineError as exc:
        refused = exc
    try:
        shared = executor.share_batch_size(batch, refused is not None, what, settings)
    except (BatchRefusedError, RanksInOtherCallsError):  # refused on every rank: go on
        raise
    except PipelineError as exc:
        _stop_here(exc, kind, on_error)
        raise
    if refused is not None:
        if kind == "torchrun":  # as the other ranks' BatchRefusedError says
            said = str(refused.args[0]) if refused.args else type(refused).__name__
            refused.args = (f"{said} (every rank skips this batch; the pipeline goes on)", *refused.args[1:])
        raise refused
    if shared is None:
        raise PipelineError(f"{what}() needs the inputs (only torchrun ranks other than 0 may pass None)")
    return shared


def prepared_here(prepare: Callable[[], T], kind: str, on_error: Callable[[BaseException], None]) -> T:
    """``prepare()`` (splitting and checking the targets). Under torchrun only the last rank
    holds them, after every rank has agreed on the batch and rank 0 has started it: a refusal
    there fails this pipeline (``on_error``, which aborts its connections), so the other ranks
    stop within a second (a lost peer) instead of waiting out the timeout.

    Raises:
        PipelineError: ``prepare``'s refusal.
    """
    try:
        return prepare()
    except PipelineError as exc:
        _stop_here(exc, kind, on_error)
        raise


def _stop_here(exc: PipelineError, kind: str, on_error: Callable[[BaseException], None]) -> None:
    """Under torchrun, fail this rank's pipeline with ``exc`` (``on_error`` aborts its
    connections); elsewhere the pipeline goes on without the batch."""
    if kind == "torchrun":
        on_error(exc)
