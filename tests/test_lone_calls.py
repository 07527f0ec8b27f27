"""A call that gathers from every rank made on one rank alone under torchrun (``pipe.stats()``
or ``pipe.state_dict()`` under ``if rank == 0``, a ``flush()`` on another rank) is refused
within a second, naming the calls (:mod:`pipeoptim.runtime.call_starts`); before, every rank
waited out the timeout (300 s by default), blaming a peer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_torchrun import _torchrun

CALLS = "under torchrun every rank calls step(), flush(), predict(), state_dict(), to_module()"


@pytest.mark.slow
def test_a_call_made_on_one_rank_alone_is_refused_within_a_second(tmp_path: Path) -> None:
    """Rank 0 alone asking for ``stats()``, then ``state_dict()``, while rank 1 steps: refused on
    both ranks at once, naming each rank's call, and the run goes on to the losses of the same
    run without them, bit for bit. Rank 1 alone flushing while rank 0 steps on: rank 0 has
    started a mini-batch without it, so rank 1's pipeline stops (RanksOutOfStepError) and rank
    0 finds its peer lost, both within seconds (timeout 60 s); a later call on either says so."""
    done = _torchrun("torchrun_lone_call_script.py", 2, str(tmp_path / "out"), str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    for result in ranks:
        (stats, stats_s), (weights, weights_s) = result["lone"]
        assert stats.startswith(
            "RanksInOtherCallsError: the ranks are in different calls (rank 0: the prediction errors "
            "(stats), its call 1; rank 1: the start of step(), its call 1): " + CALLS
        ), stats
        assert weights.startswith(
            "RanksInOtherCallsError: the ranks are in different calls (rank 0: the start of state_dict(), "
            "its call 2; rank 1: the start of step(), its call 2)"
        ), weights
        assert max(stats_s, weights_s) < 5
        assert result["with lone calls"] == result["plain"]
        assert len(result["plain"]) == 6
    assert ranks[0]["plain"] == ranks[1]["plain"]
    stop, stop_s = ranks[1]["stop"]
    assert stop.startswith(
        "RanksOutOfStepError: rank 1 started a call that gathers from every rank (the start of flush()) "
        "while rank 0 is in step() or predict() (it sent this rank a batch's rows): " + CALLS
    ), stop
    lost, lost_s = ranks[0]["stop"]
    assert lost.startswith("PeerLostError: rank 0: ") and "rank 1 has probably stopped" in lost, lost
    assert max(stop_s, lost_s) < 5
    for result, cause in zip(ranks, ("PeerLostError", "RanksOutOfStepError")):
        after, after_s = result["after"]
        assert after.startswith(f"PipelineError: the pipeline stopped at an earlier error ({cause}: "), after
        assert after_s < 1
