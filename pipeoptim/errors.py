"""Exceptions raised by pipeoptim.

Every error names the problem and the fix in its message; the class tells a program what
went wrong without parsing the text.
"""

from __future__ import annotations

import re
import traceback

#: the C++ source location gloo puts before its messages:
#: ``[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed``
_SOURCE_LOCATION = re.compile(r"^\[[^\]\s]+\.(?:cc|cpp|h):\d+\]\s*")
#: the advice gloo puts after them ("This is typically caused by a remote worker crashing.
#: Check the logs of the remote worker before reporting an error. GLHF!"): pipeoptim names the
#: stage that stopped itself
_GLOO_ADVICE = re.compile(r"\s*This is typically caused by a remote worker .*$")


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, ``""`` where it has none (an ``OSError()``: taking
    ``str(exc).splitlines()[0]`` raised ``IndexError`` while reporting the error), without a
    leading C++ source location and gloo's trailing advice (the build machine's path and a
    "GLHF!" told a user nothing)."""
    lines = str(exc).splitlines()
    return _GLOO_ADVICE.sub("", _SOURCE_LOCATION.sub("", lines[0])) if lines else ""


class PipeoptimError(Exception):
    """Base class of every error pipeoptim raises on purpose."""

    #: whether a pipeline has raised this error to the user (through a loss or a call): a
    #: stopped pipeline raises its error once as it is, then says on each later call that it
    #: stopped at it (:class:`pipeoptim.pipeline.Pipeline`)
    reported: bool = False


class TraceError(PipeoptimError):
    """The model could not be turned into a graph (``torch.fx`` and ``torch.export`` both failed)."""


class ProfileError(PipeoptimError):
    """A profile could not be measured, or a saved profile file is unusable."""


class PlanError(PipeoptimError):
    """No pipeline plan exists for the request (too many stages, bad arguments, bad plan file)."""


class InfeasibleMemoryError(PlanError):
    """No plan meets the per-stage memory limit.

    Attributes:
        limit_bytes: the limit that was asked for (bytes).
        min_feasible_bytes: the smallest per-stage limit any plan can meet (bytes).
    """

    def __init__(self, message: str, limit_bytes: int, min_feasible_bytes: int) -> None:
        super().__init__(message)
        self.limit_bytes = limit_bytes
        self.min_feasible_bytes = min_feasible_bytes

    def __reduce__(self) -> tuple:  # picklable across processes with its fields
        return (type(self), (str(self), self.limit_bytes, self.min_feasible_bytes))


class CodegenError(PipeoptimError):
    """Stage submodules could not be generated from a plan."""


class PredictorError(PipeoptimError):
    """No weight predictor exists for the optimizer, or the method does not fit the optimizer."""


class PipelineError(PipeoptimError):
    """A pipeline failed at run time (a stage crashed, timed out, or got bad input)."""


class BatchRefusedError(PipelineError):
    """Under torchrun, rank 0 refused the inputs of a batch: every rank skips it, in step."""


class RanksInOtherCallsError(PipelineError):
    """Under torchrun, the ranks made different calls that gather from every rank (one in
    ``predict``, another in ``state_dict``), or one rank such a call alone: refused where
    made, the pipeline goes on (:mod:`pipeoptim.runtime.call_starts`)."""


class PeerLostError(PipelineError):
    """A stage lost its neighbour (it stopped or crashed): a consequence, not the cause."""


class PipelineStalledError(PipelineError):
    """The schedule left actions that can never run (a bug in a schedule, not in the input)."""


class NonFiniteLossError(PipelineError):
    """The loss became NaN or infinite.

    Attributes:
        step: index of the mini-batch whose loss was not finite (0-based).
        stage: the stage that computed it.
    """

    def __init__(self, message: str, step: int, stage: int) -> None:
        super().__init__(message)
        self.step = step
        self.stage = stage

    def __reduce__(self) -> tuple:  # picklable across processes with its fields
        return (type(self), (str(self), self.step, self.stage))


class CheckpointError(PipeoptimError):
    """A checkpoint is missing, half written, or belongs to another model."""


def drop_frame_locals(exc: BaseException) -> None:
    """Clear the local variables of the finished frames of ``exc``'s traceback and of the
    exceptions it was raised from (:func:`traceback.clear_frames`; the traceback still prints
    every file and line). A failed receive's frames hold its gloo request and so its process
    group, whose connections close only with the last reference: kept by the pipeline's stored
    error, they left a torchrun rank's other neighbour waiting out the timeout."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


#: the note on autograd's "modified by an inplace operation" raised in a pipeline's backward
SAVED_THEN_CHANGED = (
    "a tensor that forward changes in place (a buffer: self.ema.mul_(0.9)) was saved for this "
    "backward and changed again by a later micro-batch's forward, which the schedule runs "
    "before this backward (plain gradient accumulation runs each backward first): read a copy "
    "where gradients flow (h @ self.ema.clone()), or train with micro_batches=1"
)
