"""Under torchrun, the losses' way from every replica's last stage to the other ranks.

A last stage sends each mini-batch's micro-batch losses to every other rank as one float64
message (tag :data:`~pipeoptim.runtime.comm.LOSS_TAG`) once the last of them is computed, so
that ``float(loss)`` works on every rank. The other ranks post the receive of a mini-batch's
losses with its forward and resolve them where a stage waits anyway: gloo reports a receive
complete only once it is waited on, so a receive left alone would never be seen done (and a
wait that times out closes the connection). A CPU buffer is therefore filled with
:data:`UNSET` before its receive is posted: gloo writes the message into the tensor's memory,
so a last value no longer :data:`UNSET` means the message has arrived (its wait returns at
once), which ``Loss.done()`` asks without blocking (before, it said False on rank 0 for
ever: helper-151). A receive ``done()`` has been asking after for a whole timeout is waited
on briefly, as ``float(loss)`` would have waited: a lost last stage then fails its loss (a
``done()`` loop spun for ever, helper-154); time between steps does not count (a script may
evaluate for longer than the timeout between two steps).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeoptim.errors import PeerLostError, first_line
from pipeoptim.runtime.comm import LOSS_TAG, DistChannel

#: the bits of a NaN no loss computes (its payload), filling a loss buffer until it arrives
UNSET = 0x7FF4_C0DE_0000_0001


class LossMail:
    """One rank's loss messages: those it sends (a last stage) and those it waits for.

    Args:
        channel: the stage's channel (its process group).
        rank: this rank; ``world``: the ranks of the job.
        num_stages: stages per replica; ``replicas``: data-parallel replicas; ``replica``:
            this rank's.
        micro_batches: M, micro-batches per mini-batch.
        on_loss: ``on_loss(micro_batch, loss, replica)`` for every loss known on this rank.
        timeout: bound of each wait.
    """

    def __init__(
        self,
        channel: DistChannel,
        rank: int,
        world: int,
        num_stages: int,
        replicas: int,
        replica: int,
        micro_batches: int,
        on_loss: Callable[..., None],
        timeout: datetime.timedelta,
    ) -> None:
        self.channel, self.rank, self.world = channel, rank, world
        self.num_stages, self.replicas, self.replica = num_stages, replicas, replica
        self.micro_batches = micro_batches
        self.on_loss = on_loss
        self.timeout = timeout
        #: receives of the last stages' losses: [first micro-batch, replica, receive, buffer,
        #: when ``done()`` first asked after it in ``time.monotonic()`` seconds, or None]
        self._pending: list[list[Any]] = []
        #: a last stage: per mini-batch in flight, its micro-batches and the losses computed
        self._losses: dict[int, tuple[int, dict[int, float]]] = {}

    def expect(self, index: int, count: int) -> None:
        """A last stage: mini-batch ``index`` has ``count`` micro-batches on this replica."""
        self._losses[index] = (count, {})

    def post(self, first: int, count: int, device: torch.device) -> None:
        """Post the receive of every replica's ``count`` losses from micro-batch ``first`` (the
        replicas' last stages other than this rank), and resolve those of mini-batches up to
        ``first − N·M``: their last stages sent them before this mini-batch's gradients could
        reach this stage, so the list stays bounded and ``step()``'s wait finds them here."""
        for replica in range(self.replicas):
            last = replica * self.num_stages + self.num_stages - 1
            if self.rank != last:
                buffer = torch.empty(count, dtype=torch.float64, device=device)
                buffer.view(torch.int64).fill_(UNSET)
                work = self.channel.irecv(buffer, last, tag=LOSS_TAG)
                self._pending.append([first, replica, work, buffer, None])
        self.poll(block=False, until=first - (self.num_stages - 1) * self.micro_batches - 1)

    def deliver(self, losses: list[tuple[int, float]], device: torch.device) -> None:
        """A last stage: hand each loss to the pipeline and, once a mini-batch's are all
        computed, send them to every other rank as one message (micro-batch order)."""
        per = self.micro_batches
        for mb, value in losses:
            # float64 as the other ranks receive it (torch.tensor(value) rounded a float64 model's loss)
            self.on_loss(mb, torch.tensor(value, dtype=torch.float64), self.replica)
            count, known = self._losses[mb // per]
            known[mb % per] = value
            if len(known) == count:
                del self._losses[mb // per]
                tensor = torch.tensor([known[j] for j in range(count)], dtype=torch.float64, device=device)
                for rank in range(self.world):
                    if rank != self.rank:
                        self.channel.isend(tensor, rank, tag=LOSS_TAG)

    def poll(self, block: bool, until: int | None = None, asking: bool = False) -> None:
        """Resolve the losses from other ranks that have arrived (all of them, or those of the
        mini-batches up to the one of micro-batch ``until``); ``asking``: for ``done()``, whose
        asking after one for a whole timeout waits on it a moment.

        Raises:
            PeerLostError: a receive failed (the last stage's rank stopped) or timed out.
        """
        while self._pending:
            first, replica, work, buffer, asked = self._pending[0]
            if asking and asked is None:
                self._pending[0][4] = asked = time.monotonic()
            overdue = asking and time.monotonic() - asked > self.timeout.total_seconds()
            must = block or (until is not None and first <= until)
            if not (must or overdue or _arrived(work, buffer)):
                return
            try:  # overdue and not awaited: a moment's wait tells a closed connection (or times out)
                work.wait(self.timeout if must or not overdue else datetime.timedelta(milliseconds=1))
            except RuntimeError as exc:  # gloo's own error: a closed connection, a timeout
                last = replica * self.num_stages + self.num_stages - 1
                raise PeerLostError(
                    f"rank {self.rank}: receiving the losses of micro-batch {first} on from rank "
                    f"{last} failed ({first_line(exc)}); rank {last} has probably stopped"
                ) from exc
            self._pending.pop(0)
            for j, value in enumerate(buffer.cpu()):
                self.on_loss(first + j, value, replica)

    def clear(self) -> None:
        """Forget the posted receives (a closed pipeline): their requests hold the group."""
        self._pending.clear()


def _arrived(work: Any, buffer: torch.Tensor) -> bool:
    """Whether the receive of ``buffer`` has completed (NCCL says so) or its message has
    arrived (a CPU buffer's last value is no longer :data:`UNSET`; a wait then finishes it)."""
    if work.is_completed():
        return True
    return buffer.device.type == "cpu" and int(buffer.view(torch.int64)[-1]) != UNSET
