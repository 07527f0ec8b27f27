"""Under torchrun, the calls every rank makes at the same point, checked to be the same call.

``predict``, ``state_dict``, ``to_module``, ``save_checkpoint``, ``load_checkpoint``,
``stats`` ... gather from (or load on) every rank. Made in another order on one rank, or
on one rank alone, the gathers paired with other calls' and returned wrong weights (helper-100:
a rank's ``to_module()`` paired with rank 0's lone ``save_checkpoint()``); two pipelines' calls
paired with each other (helper-102: one dict of stage 0 from pipeline A and stage 1 from B).
:class:`RankCalls` gathers on the pipeline's own process group (never another pipeline's or
the script's own collectives), with what each rank is gathering and how many such calls it
has made, and refuses on every rank where they differ.
"""

from __future__ import annotations

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


class RankCalls:
    """The checked gathers of one pipeline's rank over its process group ``group``."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.made = 0  # the gathers this rank has made
        #: called with ``what`` at the start of every gather but a joined one
        #: (:meth:`pipeoptim.runtime.call_starts.CallStarts.mark_gather`)
        self.mark: Callable[[str], None] | None = None

    def gather(self, what: str, value: Any, marked: bool = False) -> list[Any]:
        """Every rank's ``value``, in rank order; ``what`` names what is gathered and the
        public calls that gather it, e.g. ``"the weights (state_dict, to_module, ...)"``.
        :attr:`mark` starts it, but where this rank joins a gather rank 0 marked while this
        rank was in another call (``marked``).

        Raises:
            RanksInOtherCallsError: on every rank, where the ranks gather other things or
                are at other counts of such calls; on this rank alone, where it gathers alone
                (:attr:`mark`).
            PeerLostError: a rank did not join within the group's timeout, or stopped.
        """
        if self.mark is not None and not marked:
            self.mark(what)
        self.made += 1
        parts: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(parts, (what, self.made, value), group=self.group)
        except RuntimeError as exc:
            raise PeerLostError(
                f"rank {self.rank}: gathering {what} from every rank failed ({first_line(exc)}): under "
                f"torchrun every rank calls {CALLS} at the same point of the script, or a rank has stopped"
            ) from exc
        if len({(w, n) for w, n, _ in parts}) > 1:
            same = len({w for w, _, _ in parts}) == 1  # the same call, at other counts of them
            said = "; ".join(
                f"rank {r}: {w}" + (f", its gather {n}" if same else "") for r, (w, n, _) in enumerate(parts)
            )
            raise RanksInOtherCallsError(
                f"the ranks are in different calls ({said}): under torchrun every rank calls {CALLS} at "
                "the same point of the script, not on one rank alone"
            )
        return [part for _, _, part in parts]

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
