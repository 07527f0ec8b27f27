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
def test_a_call_made_on_one_rank_alone_is_refused_there_at_once_and_training_goes_on(tmp_path: Path) -> None:
    """Rank 0 alone asking for ``stats()``, then ``state_dict()``, while rank 1 steps, and rank 1
    alone flushing, then asking for ``stats()``, while rank 0 steps: each call is refused on
    its rank within a second, naming the calls; the other rank never notices, and both train
    on to the losses of the run without those calls, bit for bit. Rank 0 alone asking for the
    weights at the end, then every rank closing: refused, and both close within seconds
    (rank 1's close() is refused too: a close whose finish fails no longer waits for its sends,
    helper-169). Before, every rank waited out the timeout (60 s here)."""
    done = _torchrun("torchrun_lone_call_script.py", 2, str(tmp_path / "out"), str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    (stats, stats_s), (weights, weights_s) = ranks[0]["lone"]
    assert stats.startswith(
        "RanksInOtherCallsError: the ranks are in different calls (rank 0: the prediction errors "
        "(stats); rank 1: step() (waiting for rank 0's)): " + CALLS
    ), stats
    assert weights.startswith(
        "RanksInOtherCallsError: the ranks are in different calls (rank 0: the start of state_dict(); "
        "rank 1: step() (waiting for rank 0's))"
    ), weights
    (flush, flush_s), (stats_1, stats_1_s) = ranks[1]["lone"]
    for lone, what in ((flush, "the start of flush()"), (stats_1, "the prediction errors (stats)")):
        assert lone.startswith(
            f"RanksInOtherCallsError: rank 1 is gathering {what} alone: rank 0 is in step() or predict() "
            "(it sent this rank a batch's rows); " + CALLS
        ), lone
        assert lone.endswith(
            "Nothing was gathered, and this rank's next step() or predict() takes part in rank 0's"
        )
    assert max(stats_s, weights_s, flush_s, stats_1_s) < 5
    for result in ranks:
        assert len(result["plain"]) == 6
        assert result["rank 0 alone"] == result["rank 1 alone"] == result["plain"] == ranks[0]["plain"]
    save, save_s = ranks[0]["save"]
    assert save.startswith(
        "RanksInOtherCallsError: the ranks are in different calls (rank 0: the start of state_dict(); "
        "rank 1: the start of close())"
    ), save
    assert ranks[1]["close"][0].startswith("RanksInOtherCallsError: the ranks are in different calls"), ranks[
        1
    ]
    assert ranks[0]["close"][0].startswith("PeerLostError: "), ranks[0]["close"]
    assert save_s < 5 and max(r["close_s"] for r in ranks) < 5
