"""Under torchrun, what rank 0 tells every other rank at the start of each call they all
take part in, so that every rank knows which call rank 0 is in.

Every ``step()`` and ``predict()`` starts with rank 0's message of the batch's rows (the other
ranks may have been given no inputs; a step's message carries a digest of its optimizer
hyperparameters), and every call that gathers from all ranks (``state_dict()``, ``stats()``,
``flush()``, ``save_checkpoint()``, :class:`~pipeoptim.runtime.rank_calls.RankCalls`) starts
with rank 0's mark of a gather, in the same stream (one tag, one order). A call made on one
rank alone (``pipe.stats()`` under ``if rank == 0``, a ``flush()`` on rank 1 alone) is thereby
refused on that rank at once (:class:`~pipeoptim.errors.RanksInOtherCallsError`, naming the
calls), and the other ranks go on as if it had not been made:

- a rank in ``step()`` or ``predict()`` that finds a gather's mark joins that gather, which
  refuses rank 0's call, then waits on for rank 0's batch;
- a rank starting a gather that finds a batch's rows instead keeps them for its next
  ``step()`` or ``predict()``, the one rank 0 has started.

Before, every rank waited out the timeout (300 s by default), blaming a peer.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

import torch

from pipeoptim.errors import (
    BatchRefusedError,
    PeerLostError,
    PipelineError,
    RanksInOtherCallsError,
    first_line,
)
from pipeoptim.microbatch import Rows
from pipeoptim.runtime.comm import DistChannel
from pipeoptim.runtime.rank_calls import CALLS, RankCalls
from pipeoptim.runtime.rank_settings import digest

SIZE_TAG = 8  # rank 0's messages at the start of a call, to every other rank
REFUSED = -2  # first value of the message of a batch rank 0 refused
GATHER = -3  # first value of the mark of a gather


class CallStarts:
    """Rank 0's messages at the start of each call, sent (rank 0) or awaited (the others)
    over ``channel``, each wait bounded by ``timeout``; ``calls``: the rank's gathers, which
    mark their start here (:meth:`mark_gather`)."""

    def __init__(
        self, channel: DistChannel, rank: int, world: int, timeout: datetime.timedelta, calls: RankCalls
    ):
        self.channel, self.rank, self.world, self.timeout = channel, rank, world, timeout
        self.calls = calls
        calls.mark = self.mark_gather
        #: rank 0's message of a batch that a gather made on this rank alone found: this
        #: rank's next step() or predict() reads it (the call rank 0 has started)
        self._kept: torch.Tensor | None = None

    def share_batch_size(
        self, batch: Rows | None, refused: bool = False, call: str = "step", settings: object = None
    ) -> Rows | None:
        """Rank 0's ``batch`` (rows and sequence length of the next mini-batch or predict
        batch) on every rank. Other ranks' own ``batch`` (``None`` where they got no inputs)
        must agree with it, and so must their ``settings`` (the optimizer's hyperparameters
        for a step, in the same message as a 48-bit digest: a scheduler stepped on rank 0
        alone trained the stages with other learning rates, silently; helper-130).
        ``refused`` on rank 0: it refused its inputs, and so does every rank (none starts the
        batch). ``call``: ``"step"`` or ``"predict"``. A gather rank 0 makes meanwhile is
        joined (and refused there) on the way.

        Raises:
            PipelineError: rank 0 got no inputs or refused them, or another rank's inputs have
                other rows, or its settings are not rank 0's.
            PeerLostError: rank 0 sent nothing within the timeout.
        """
        said = int(digest(settings), 16)
        if self.rank == 0:
            self._send([REFUSED, -1, said] if refused or batch is None else [batch, batch.length or -1, said])
            if batch is None and not refused:  # refused everywhere: the pipeline goes on
                raise BatchRefusedError(
                    f"rank 0 runs the first stage and needs the inputs: pass them to {call}() there "
                    "(other ranks may pass None); every rank skips this batch, the pipeline goes on"
                )
            return None if refused else batch
        box = self._from_rank_0(f"the batch size of {call}()")
        while int(box[0]) == GATHER:  # rank 0 gathers alone: refused there, this call waits on
            with contextlib.suppress(RanksInOtherCallsError):
                self.calls.gather(f"{call}()", None, waiting=True)
            box = self._from_rank_0(f"the batch size of {call}()")
        if int(box[0]) == REFUSED:
            raise BatchRefusedError(
                "rank 0 refused the inputs of this batch (its error says why), so every rank skips "
                "it; the pipeline goes on with the next"
            )
        if int(box[2]) != said:
            raise PipelineError(
                f"rank {self.rank}'s optimizer steps this {call}'s batch with other hyperparameters than "
                f"rank 0's (here {settings!r}): under torchrun every rank changes them alike (a "
                "learning-rate scheduler stepped on every rank, not under `if rank == 0`)"
            )
        shared = Rows(int(box[0]), None if int(box[1]) < 0 else int(box[1]))
        if batch is not None and (batch, batch.length) != (shared, shared.length):
            raise PipelineError(
                f"rank {self.rank} got a batch of {batch!r} but rank 0 one of {shared!r}: give every "
                "rank the same batches (or None on ranks that do not read them)"
            )
        return shared

    def mark_gather(self, what: str) -> None:
        """The start of a gather of ``what`` (:meth:`RankCalls.gather`): rank 0 marks it to
        every other rank; the others check that rank 0 marked one.

        Raises:
            RanksInOtherCallsError: rank 0 sent a batch's rows instead (it is in ``step()`` or
                ``predict()``): kept for this rank's next such call.
            PeerLostError: rank 0 sent nothing within the timeout.
        """
        if self.rank == 0:
            self._send([GATHER, 0, 0])
            return
        box = self._from_rank_0(f"the start of its gather of {what}")
        if int(box[0]) != GATHER:
            self._kept = box
            raise RanksInOtherCallsError(
                f"rank {self.rank} is gathering {what} alone: rank 0 is in step() or predict() (it sent "
                f"this rank a batch's rows); under torchrun every rank calls {CALLS} at the same point "
                "of the script, not on one rank alone. Nothing was gathered, and this rank's next "
                "step() or predict() takes part in rank 0's"
            )

    def _send(self, values: list[Any]) -> None:
        message = torch.tensor(values, dtype=torch.int64)  # one tensor, read by every send
        for rank in range(1, self.world):
            self.channel.isend(message, rank, tag=SIZE_TAG)

    def _from_rank_0(self, what: str) -> torch.Tensor:
        """Rank 0's next message (first one kept by :meth:`mark_gather`)."""
        if self._kept is not None:
            box, self._kept = self._kept, None
            return box
        box = torch.empty(3, dtype=torch.int64)
        try:
            self.channel.irecv(box, 0, tag=SIZE_TAG).wait(self.timeout)
        except RuntimeError as exc:
            raise PeerLostError(
                f"rank {self.rank}: {what} from rank 0 did not arrive ({first_line(exc)}); rank 0 has "
                "probably stopped or is not making the same calls"
            ) from exc
        return box
