"""Under torchrun, what rank 0 tells every other rank at the start of each call they all
take part in, so that every rank knows which call rank 0 is in.

Every ``step()`` and ``predict()`` starts with rank 0's message of the batch's rows (the other
ranks may have been given no inputs; a step's message carries a digest of its optimizer
hyperparameters), and every call that gathers from all ranks (``state_dict()``, ``stats()``,
``flush()``, ``save_checkpoint()``, :class:`~pipeoptim.runtime.rank_calls.RankCalls`) starts
with rank 0's mark of a gather, in the same stream (one tag, one order). A rank that finds
the other kind of message than its call expects is out of step with rank 0:

- in ``step()`` or ``predict()`` it finds a gather's mark (``pipe.stats()`` under ``if rank
  == 0``): it joins that gather, which refuses the call on every rank, naming both calls
  (:class:`~pipeoptim.errors.RanksInOtherCallsError`); the pipeline goes on;
- starting a gather it finds a batch's rows (the lone call made on another rank than 0): rank 0
  has started that batch without it, so it stops its pipeline
  (:class:`~pipeoptim.errors.RanksOutOfStepError`), and the other ranks find their peer lost
  within a second.

Before, in both cases every rank waited out the timeout (300 s by default), blaming a peer.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch

from pipeoptim.errors import (
    BatchRefusedError,
    PeerLostError,
    PipelineError,
    RanksOutOfStepError,
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

    def share_batch_size(
        self, batch: Rows | None, refused: bool = False, call: str = "step", settings: object = None
    ) -> Rows | None:
        """Rank 0's ``batch`` (rows and sequence length of the next mini-batch or predict
        batch) on every rank. Other ranks' own ``batch`` (``None`` where they got no inputs)
        must agree with it, and so must their ``settings`` (the optimizer's hyperparameters
        for a step, in the same message as a 48-bit digest: a scheduler stepped on rank 0
        alone trained the stages with other learning rates, silently; helper-130).
        ``refused`` on rank 0: it refused its inputs, and so does every rank (none starts the
        batch). ``call``: ``"step"`` or ``"predict"``.

        Raises:
            PipelineError: rank 0 got no inputs or refused them, or another rank's inputs have
                other rows, or its settings are not rank 0's.
            RanksInOtherCallsError: rank 0 is in a call that gathers (on every rank).
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
        if int(box[0]) == GATHER:  # rank 0 is gathering: joined, the gather refuses both calls
            self.calls.gather(f"the start of {call}()", None, marked=True)
            raise RanksOutOfStepError(  # the gather let a step pass for a gather: a bug of ours
                f"rank {self.rank} in {call}() joined a gather of rank 0 that did not refuse it"
            )
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
            RanksOutOfStepError: rank 0 sent a batch's rows instead (it is in ``step()`` or
                ``predict()``, started without this rank).
            PeerLostError: rank 0 sent nothing within the timeout.
        """
        if self.rank == 0:
            self._send([GATHER, 0, 0])
            return
        if int(self._from_rank_0(f"the start of its gather of {what}")[0]) != GATHER:
            raise RanksOutOfStepError(
                f"rank {self.rank} started a call that gathers from every rank ({what}) while rank 0 "
                f"is in step() or predict() (it sent this rank a batch's rows): under torchrun every "
                f"rank calls {CALLS} at the same point of the script, not on one rank alone; this "
                "rank's pipeline stops, and so do the others'"
            )

    def _send(self, values: list[Any]) -> None:
        for rank in range(1, self.world):
            self.channel.isend(torch.tensor(values, dtype=torch.int64), rank, tag=SIZE_TAG)

    def _from_rank_0(self, what: str) -> torch.Tensor:
        box = torch.empty(3, dtype=torch.int64)
        try:
            self.channel.irecv(box, 0, tag=SIZE_TAG).wait(self.timeout)
        except RuntimeError as exc:
            raise PeerLostError(
                f"rank {self.rank}: {what} from rank 0 did not arrive ({first_line(exc)}); rank 0 has "
                "probably stopped or is not making the same calls"
            ) from exc
        return box
