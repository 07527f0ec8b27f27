"""A call that gathers from every rank made on one rank alone under torchrun (``pipe.stats()``
or ``pipe.state_dict()`` under ``if rank == 0``, a ``flush()`` on another rank) is refused on
that rank within a second, naming the calls, and the other ranks go on
(:mod:`pipeoptim.runtime.call_starts`, :func:`pipeoptim.runtime.rank_calls.agreed_call`);
before, every rank waited out the timeout (300 s by default), blaming a peer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeoptim.runtime.rank_calls import CALLS, agreed_call
from tests.test_torchrun import _torchrun

STATS, OPT = "the prediction errors (stats)", "the start of optimizer_state_dict()"
DIFFERENT = "RanksInOtherCallsError: the ranks are in different calls ("
TAIL = f"): under torchrun every rank calls {CALLS} at the same point of the script, not on one rank alone"


@pytest.mark.parametrize(
    "calls, agreed",
    [
        ([(STATS, False), ("step()", True)], "step()"),  # the step waits on: rank 0 gives way
        ([(STATS, False), ("b", False), ("b", False)], "b"),  # most ranks' call
        ([("b", False), (STATS, False), ("b", False)], "b"),
        ([("the start of close()", False), (STATS, False), (STATS, False)], STATS),
        # a tie: logging gives way, then saving, then the rest; close() never; then rank 0's
        ([(STATS, False), ("the start of state_dict()", False)], "the start of state_dict()"),
        ([("the start of state_dict()", False), (STATS, False)], "the start of state_dict()"),
        ([("the start of state_dict()", False), ("the start of close()", False)], "the start of close()"),
        ([("the start of predict()", False), ("the start of state_dict()", False)], "the start of predict()"),
        ([(OPT, False), ("the start of to_module()", False)], "the start of to_module()"),
        ([("the start of to_module()", False), (OPT, False)], OPT),
        ([("a", False), ("b", False), ("c", False)], None),  # a tie without rank 0's: none
        ([("a", False), ("b", False), ("b", False), ("a", False)], "b"),
        ([("a", False), ("b", False), ("step()", True)], "step()"),
    ],
)
def test_the_call_the_ranks_go_on_with(calls: list[tuple[str, bool]], agreed: str | None) -> None:
    assert agreed_call(calls) == agreed


@pytest.mark.slow
def test_a_call_made_on_one_rank_alone_is_refused_there_at_once_and_training_goes_on(tmp_path: Path) -> None:
    """3 ranks, PipeOptim. Rank 0 alone asking for ``stats()``, then ``state_dict()``, while the
    others step, and rank 1 alone flushing, then asking for ``stats()``, while the others step:
    each call is refused on its rank within a second, naming the calls; the others never notice,
    and all train on to the losses of the run without those calls, bit for bit. After the last
    step, rank 0 alone asking for ``stats()`` before every rank asks for the weights: refused,
    and then every rank gets the weights of the plain run; rank 1 alone asking for them again
    while the others close: refused, and every rank closes, finishing. Before, every rank waited
    out the timeout (60 s here); then, a lone call paired with the others' next one and every
    later call was refused (helper-170)."""
    done = _torchrun("torchrun_lone_call_script.py", 3, str(tmp_path / "out"), str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(3)]
    steps = "rank 1: step() (waiting for rank 0's); rank 2: step() (waiting for rank 0's)"
    assert [said for said, _ in ranks[0]["lone"]] == [
        f"{DIFFERENT}rank 0: the prediction errors (stats); {steps}{TAIL}; this rank's call is refused, "
        "the others wait in step()",
        f"{DIFFERENT}rank 0: the start of state_dict(); {steps}{TAIL}; this rank's call is refused, the "
        "others wait in step()",
    ]
    assert [said for said, _ in ranks[1]["lone"]] == [
        f"RanksInOtherCallsError: rank 1 is gathering {what} alone: rank 0 is in step() or predict() (it "
        f"sent this rank a batch's rows); under torchrun every rank calls {CALLS} at the same point of the "
        "script, not on one rank alone. Nothing was gathered, and this rank's next step() or predict() "
        "takes part in rank 0's"
        for what in ("the start of flush()", "the prediction errors (stats)")
    ]
    assert ranks[2]["lone"] == []
    for result in ranks:
        assert len(result["plain"]) == 6
        assert result["rank 0 alone"] == result["rank 1 alone"] == result["plain"] == ranks[0]["plain"]
        assert max([s for _, s in result["lone"]] + [s for _, s in result["end"]]) < 5
    weights = ranks[0]["plain weights"]
    assert [value for value, _ in ranks[0]["end"]] == [
        f"{DIFFERENT}rank 0: the prediction errors (stats); rank 1: the start of state_dict(); rank 2: the "
        f"start of state_dict(){TAIL}; this rank's call is refused, the others wait in the start of "
        "state_dict()",
        weights,
        None,  # closed, finishing
    ]
    assert [value for value, _ in ranks[1]["end"]] == [
        weights,
        f"{DIFFERENT}rank 0: the start of close(); rank 1: the start of state_dict(); rank 2: the start of "
        f"close(){TAIL}; this rank's call is refused, the others wait in the start of close()",
        None,
    ]
    assert [value for value, _ in ranks[2]["end"]] == [weights, None]


def test_the_errors_of_calls_under_torchrun_are_public() -> None:
    """``except pipeoptim.RanksInOtherCallsError`` as the README names it (an AttributeError
    before, helper-170), and so for the refused batch and the lost peer."""
    import pipeoptim
    from pipeoptim import errors

    assert pipeoptim.RanksInOtherCallsError is errors.RanksInOtherCallsError
    assert pipeoptim.BatchRefusedError is errors.BatchRefusedError
    assert pipeoptim.PeerLostError is errors.PeerLostError
    assert issubclass(pipeoptim.RanksInOtherCallsError, pipeoptim.PipelineError)
