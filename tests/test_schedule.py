"""Schedules as plain action lists."""

from __future__ import annotations

import pytest

from pipeoptim.runtime.schedule import (
    BACKWARD,
    FORWARD,
    STEP,
    Schedule,
    actions,
    count_version_differences,
    format_actions,
)


def ops(stage_actions, op):
    return [a.micro_batch for a in stage_actions if a.op == op]


def max_in_flight(stage_actions) -> int:
    live, peak = 0, 0
    for a in stage_actions:
        live += a.op == FORWARD
        live -= a.op == BACKWARD
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, micro", [(2, 4), (4, 4), (4, 2), (3, 8)])
def test_flushing_schedules(kind: str, stages: int, micro: int) -> None:
    lists = actions(kind, stages, 2, micro)
    for k, acts in enumerate(lists):
        assert ops(acts, FORWARD) == list(range(2 * micro))
        assert sorted(ops(acts, BACKWARD)) == list(range(2 * micro))
        steps = [i for i, a in enumerate(acts) if a.op == STEP]
        assert steps == [2 * micro, 4 * micro + 1]  # one step per mini-batch, after its backwards
        assert all(a.version_diff == 0 for a in acts if a.op == FORWARD)
        expected = micro if kind == "gpipe" else min(stages - k, micro)
        assert max_in_flight(acts[: steps[0]]) == expected
        if kind == "1f1b":
            warmup = min(stages - k - 1, micro)
            assert [a.op for a in acts[:warmup]] == [FORWARD] * warmup
            if warmup < micro:  # steady state: one forward, one backward
                assert (acts[warmup].op, acts[warmup + 1].op) == (FORWARD, BACKWARD)
            else:  # all forwards were warm-up: cool-down follows
                assert acts[warmup].op == BACKWARD


def test_1f1b_text_form() -> None:
    text = format_actions(actions("1f1b", 4, 1, 4))
    assert text.splitlines() == [
        "stage 0: F0 F1 F2 F3 B0 B1 B2 B3 S0",
        "stage 1: F0 F1 F2 B0 F3 B1 B2 B3 S0",
        "stage 2: F0 F1 B0 F2 B1 F3 B2 B3 S0",
        "stage 3: F0 B0 F1 B1 F2 B2 F3 B3 S0",
    ]


@pytest.mark.parametrize("stages", [1, 2, 4, 5])
def test_async_1f1b_steps_after_every_backward_and_counts_version_differences(stages: int) -> None:
    lists = actions("async-1f1b", stages, 12)
    for k, acts in enumerate(lists):
        for i, a in enumerate(acts):
            if a.op == BACKWARD:
                assert acts[i + 1].op == STEP
        counted = count_version_differences(acts)
        annotated = {a.micro_batch: a.version_diff for a in acts if a.op == FORWARD}
        assert counted == annotated
        # steady state: N - k - 1 steps between a forward and its backward
        assert all(annotated[mb] == stages - k - 1 for mb in range(stages, 12 - stages))
        # warm-up: micro-batch j meets j steps
        assert [annotated[j] for j in range(stages - k - 1)] == list(range(stages - k - 1))
        assert max_in_flight(acts) == min(stages - k, 12)


def test_online_schedule_with_flushes_matches_counts() -> None:
    schedule = Schedule("async-1f1b", 3)
    lists = [[], [], []]
    for n in (5, 2, 4):
        for _ in range(n):
            for k, new in enumerate(schedule.on_mini_batch()):
                lists[k] += new
        for k, new in enumerate(schedule.on_flush()):
            lists[k] += new
    for acts in lists:
        assert ops(acts, FORWARD) == list(range(11)) == sorted(ops(acts, BACKWARD))
        assert count_version_differences(acts) == {
            a.micro_batch: a.version_diff for a in acts if a.op == FORWARD
        }
    # after each flush the pipeline warms up again: the first forward meets no step
    firsts = [a for a in lists[0] if a.op == FORWARD and a.micro_batch in (0, 5, 7)]
    assert [a.version_diff for a in firsts] == [0, 0, 0]


def test_2bw_steps_every_m_backwards() -> None:
    lists = actions("async-1f1b", 4, 3, micro_batches=4, steps_every=4)
    for acts in lists:
        backs = 0
        for a in acts:
            if a.op == BACKWARD:
                backs += 1
            elif a.op == STEP:
                assert backs % 4 == 0
        assert sum(a.op == STEP for a in acts) == 3
        assert count_version_differences(acts) == {
            a.micro_batch: a.version_diff for a in acts if a.op == FORWARD
        }
        assert max(a.version_diff for a in acts if a.op == FORWARD) <= 1  # two versions suffice


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("zigzag", 2)
    with pytest.raises(ValueError, match="positive"):
        Schedule("1f1b", 0)
