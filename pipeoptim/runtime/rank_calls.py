"""Under torchrun, the calls every rank makes at the same point, checked to be the same call.

``predict``, ``state_dict``, ``to_module``, ``save_checkpoint``, ``load_checkpoint``,
``stats`` ... gather from (or load on) every rank. Made in another order on one rank, or
on one rank alone, the gathers paired with other calls' and returned wrong weights (helper-100:
a rank's ``to_module()`` paired with rank 0's lone ``save_checkpoint()``); two pipelines' calls
paired with each other (helper-102: one dict of stage 0 from pipeline A and stage 1 from B).
:class:`RankCalls` gathers on the pipeline's own process group (never another pipeline's or
the script's own collectives), with what each rank is gathering, and where they differ refuses
the calls but the one most ranks are in (:func:`agreed_call`), whose ranks gather again; rank 0
marks each gather's start (:mod:`pipeoptim.runtime.call_starts`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from pipeoptim.errors import PeerLostError, PipelineError, RanksInOtherCallsError, first_line
from pipeoptim.runtime.rank_settings import digest

#: what every rank must call at the same point (said in the errors)
CALLS = (
    "step(), flush(), predict(), state_dict(), to_module(), optimizer_state_dict(), save_checkpoint(), "
    "load_checkpoint(), load_state_dict(), load_optimizer_state_dict(), stats(), stage_state_dicts(), "
    "peak_weight_versions, resident_bytes(), sent_bytes() and close()"
)


#: how often each call is made on one rank alone, where it is not the call most ranks are
#: in (a tie): logging calls most often (``if rank == 0: print(pipe.stats())``), then saving
#: calls, then the rest (1); ``close()``, which every rank makes (leaving its ``with`` block), never
LONE = {
    "stats": 3,
    "peak_weight_versions": 3,
    "resident_bytes": 3,
    "sent_bytes": 3,
    "stage_state_dicts": 3,
    "state_dict": 2,
    "to_module": 2,
    "optimizer_state_dict": 2,
    "save_checkpoint": 2,
    "close": 0,
}


def call_of(label: str) -> str:
    """The public call a gather's label names: ``"the start of state_dict()"`` -> state_dict,
    ``"the prediction errors (stats)"`` -> stats (the first name in its parentheses)."""
    found = re.search(r"the start of (\w+)\(\)|\((\w+)", label)
    return next(name for name in found.groups() if name) if found else label


def agreed_call(calls: list[tuple[str, bool]]) -> str | None:
    """Of the calls of a gather whose ranks are in other calls (each rank's label, and whether
    it only waits in step() or predict() for rank 0's), the one the ranks in it go on with, the
    others giving way: a waiting rank's (it goes on waiting; every other call gives way to the
    step); else the call most ranks are in; of a tie, the call least often made on one rank
    alone (:data:`LONE`), then not rank 0's; none where that leaves a tie. A wrong guess costs
    refusals: the ranks then fall one call apart (helper-171)."""
    waiting = [label for label, wait in calls if wait]
    if waiting:
        return waiting[0]
    counts = Counter(label for label, _ in calls)
    top = [label for label, n in counts.items() if n == max(counts.values())]
    least = min(LONE.get(call_of(label), 1) for label in top)
    top = [label for label in top if LONE.get(call_of(label), 1) == least]
    if len(top) > 1 and calls[0][0] in top:
        top.remove(calls[0][0])
    return top[0] if len(top) == 1 else None


class RankCalls:
    """The checked gathers of one pipeline's rank over its process group ``group``."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        #: called with ``what`` at the start of every gather but a joined one
        #: (:meth:`pipeoptim.runtime.call_starts.CallStarts.mark_gather`)
        self.mark: Callable[[str], None] | None = None

    def gather(self, what: str, value: Any, waiting: bool = False) -> list[Any]:
        """Every rank's ``value``, in rank order; ``what`` names what is gathered and the
        public calls that gather it, e.g. ``"the weights (state_dict, to_module, ...)"``.
        :attr:`mark` starts it; ``waiting``: this rank, in step() or predict(), joins a gather
        rank 0 marked (:mod:`pipeoptim.runtime.call_starts`), only to refuse it. Where the
        ranks are in other calls, those whose call is not :func:`agreed_call` refuse theirs, and
        the others gather again (a lone call given way to).

        Raises:
            RanksInOtherCallsError: this rank's call is not the one the ranks go on with (every
                rank's, where none is), or this rank gathers alone (:attr:`mark`), or waits.
            PeerLostError: a rank did not join within the group's timeout, or stopped.
        """
        while True:
            if self.mark is not None and not waiting:
                self.mark(what)
            parts: list[Any] = [None] * self.world
            try:
                dist.all_gather_object(parts, (what, waiting, value), group=self.group)
            except RuntimeError as exc:
                raise PeerLostError(
                    f"rank {self.rank}: gathering {what} from every rank failed ({first_line(exc)}): "
                    f"under torchrun every rank calls {CALLS} at the same point of the script, or a rank "
                    "has stopped"
                ) from exc
            calls = [(w, wait) for w, wait, _ in parts]
            if len(set(calls)) == 1 and not waiting:
                return [part for _, _, part in parts]
            agreed = agreed_call(calls)
            if what != agreed or any(wait for _, wait in calls):  # this rank's wait among them
                said = "; ".join(
                    f"rank {r}: {w}" + (" (waiting for rank 0's)" if wait else "")
                    for r, (w, wait) in enumerate(calls)
                )
                after = (
                    "" if agreed is None else f"; this rank's call is refused, the others wait in {agreed}"
                )
                raise RanksInOtherCallsError(
                    f"the ranks are in different calls ({said}): under torchrun every rank calls {CALLS} "
                    f"at the same point of the script, not on one rank alone{after}"
                )

    def same_call(self, call: str, failure: BaseException | None = None) -> None:
        """Check that every rank is making the public ``call`` (``"state_dict"``,
        ``"save_checkpoint"``, ``"flush"`` ...): its gathers of weights or state are labelled
        by what they gather, which two calls share (``save_checkpoint()`` on one rank paired
        with ``state_dict()`` on another; a ``flush()`` on one rank alone trained the others
        on without it, helper-130). ``failure``: this rank's own refusal of the call (a
        checkpoint it cannot read), raised here after every rank has said whether it has one.

        Raises:
            RanksInOtherCallsError: the ranks are in other calls (:meth:`gather`).
            BaseException: ``failure``, on its rank.
            PipelineError: on the other ranks, naming the rank that failed and why.
        """
        said = None if failure is None else f"{type(failure).__name__}: {first_line(failure)}"
        failed = [(r, m) for r, m in enumerate(self.gather(f"the start of {call}()", said)) if m]
        if failure is not None:
            raise failure
        if failed:
            rank, message = failed[0]
            raise PipelineError(f"rank {rank} refused {call}() ({message}), so every rank does")

    def same_everywhere(self, what: str, state: Any) -> None:
        """Check that every rank loads the same ``state`` (:func:`digest`), in the same call;
        ``what`` as for :meth:`gather`, without the article: ``"weights (load_state_dict, ...)"``.

        Raises:
            PipelineError: on every rank, where they load different states (each rank loaded
                its stage's part of its own file: the stages held parts of two runs, silently).
        """
        digests = self.gather(f"a load of {what}", digest(state))
        if len(set(digests)) > 1:
            said = "; ".join(f"rank {r}: {d}" for r, d in enumerate(digests))
            raise PipelineError(
                f"the ranks load different {what.split(' (')[0]} ({said}): every rank loads the same "
                "(the same checkpoint file, or a copy of it; an optimizer that stepped before compile "
                "holds the same state on every rank), or the stages would hold parts of several"
            )
