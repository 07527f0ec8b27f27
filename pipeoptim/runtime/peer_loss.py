"""A stage's view of a neighbour that went away: the backend's error, as a consequence.

When a stage process dies, its neighbours' next ``torch.distributed`` call fails with the
backend's own error (gloo: ``Connection closed by peer``, ``Read error ... Connection reset by
peer``), often before the driver has noticed the death. Reported as such, the error named
the neighbour instead of the stage that died; classified as :class:`PeerLostError`, it is
treated as a symptom and the driver looks for the cause
(:class:`pipeoptim.runtime.distributed.ProcessExecutor`).
"""

from __future__ import annotations

from pipeoptim.errors import PeerLostError, PipelineError, first_line

#: what gloo's and NCCL's errors say when the other end of a connection has gone away
_LOST_CONNECTION = (
    "connection closed by peer",
    "connection reset by peer",
    "read error",
    "write error",
    "broken pipe",
    "socket closed",
    "remote process exited",
    "nccl communicator was aborted",
)


def lost_peer(exc: BaseException, rank: int) -> PeerLostError | None:
    """``exc`` as a :class:`PeerLostError` when it is a backend error saying that the other end
    of a connection went away (raised by any ``torch.distributed`` call, not only by the waits
    :mod:`pipeoptim.runtime.comm` wraps); None for any other error.

    A stage whose neighbour was killed sees this error, often before the driver notices the
    dead process: reporting it as a consequence lets the driver blame the stage that died.
    """
    if isinstance(exc, PeerLostError):
        return exc
    if not isinstance(exc, RuntimeError) or isinstance(exc, PipelineError):
        return None
    first = first_line(exc)
    if not any(marker in first.lower() for marker in _LOST_CONNECTION):
        return None
    lost = PeerLostError(f"stage {rank}: lost a connection ({first}); another stage has probably stopped")
    lost.__cause__ = exc
    return lost
