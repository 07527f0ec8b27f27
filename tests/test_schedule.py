"""Schedules as plain action lists."""

from __future__ import annotations

import pytest

from pipeoptim.methods import get_method
from pipeoptim.runtime.schedule import (
    BACKWARD,
    FORWARD,
    STEP,
    Action,
    Op,
    actions,
    count_version_differences,
    deferred_tail,
    format_actions,
    schedule_for,
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
    schedules = [schedule_for(k, "async-1f1b", 3) for k in range(3)]
    lists = [[], [], []]
    for n in (5, 2, 4):
        for _ in range(n):
            for k, schedule in enumerate(schedules):
                lists[k] += schedule.on_mini_batch()
        for k, schedule in enumerate(schedules):
            lists[k] += schedule.on_flush()
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
        schedule_for(0, "zigzag", 2)
    with pytest.raises(ValueError, match="positive"):
        schedule_for(0, "1f1b", 0)
    with pytest.raises(ValueError, match=r"stage 2 is not one of the 2 stages \(0\.\.1\)"):
        schedule_for(2, "1f1b", 2)


# The exact action lists of every method for N = 4 stages, M = 4 micro-batches per mini-batch
# (1 for the methods that do not split mini-batches), two mini-batches and a flush. gpipe and
# 1f1b are the tables of their papers (GPipe fig. 2c; PipeDream-Flush / Megatron-LM 1F1B):
# warm-up of N-k-1 forwards, then one forward and one backward in turn, then the cool-down.
# The asynchronous lists step after every backward (every M-th for 2bw) and annotate each
# forward with the steps before its backward (s = N-k-1 in the steady state).
EXACT = {
    "gpipe": [
        "F0 F1 F2 F3 B0 B1 B2 B3 S0 F4 F5 F6 F7 B4 B5 B6 B7 S1",
        "F0 F1 F2 F3 B0 B1 B2 B3 S0 F4 F5 F6 F7 B4 B5 B6 B7 S1",
        "F0 F1 F2 F3 B0 B1 B2 B3 S0 F4 F5 F6 F7 B4 B5 B6 B7 S1",
        "F0 F1 F2 F3 B0 B1 B2 B3 S0 F4 F5 F6 F7 B4 B5 B6 B7 S1",
    ],
    "1f1b": [
        "F0 F1 F2 F3 B0 B1 B2 B3 S0 F4 F5 F6 F7 B4 B5 B6 B7 S1",
        "F0 F1 F2 B0 F3 B1 B2 B3 S0 F4 F5 F6 B4 F7 B5 B6 B7 S1",
        "F0 F1 B0 F2 B1 F3 B2 B3 S0 F4 F5 B4 F6 B5 F7 B6 B7 S1",
        "F0 B0 F1 B1 F2 B2 F3 B3 S0 F4 B4 F5 B5 F6 B6 F7 B7 S1",
    ],
    "async": [  # pipedream, pipeoptim, spectrain, none: M = 1, one step per backward
        "F0 F1(s=1) F2(s=2) F3(s=3) B0 S0 B1 S1 B2 S2 B3 S3",
        "F0 F1(s=1) F2(s=2) B0 S0 F3(s=2) B1 S1 B2 S2 B3 S3",
        "F0 F1(s=1) B0 S0 F2(s=1) B1 S1 F3(s=1) B2 S2 B3 S3",
        "F0 B0 S0 F1 B1 S1 F2 B2 S2 F3 B3 S3",
    ],
    "2bw": [
        "F0 F1 F2 F3 B0 F4(s=1) B1 F5(s=1) B2 F6(s=1) B3 S0 F7 B4 B5 B6 B7 S1",
        "F0 F1 F2 B0 F3 B1 F4(s=1) B2 F5(s=1) B3 S0 F6 B4 F7 B5 B6 B7 S1",
        "F0 F1 B0 F2 B1 F3 B2 F4(s=1) B3 S0 F5 B4 F6 B5 F7 B6 B7 S1",
        "F0 B0 F1 B1 F2 B2 F3 B3 S0 F4 B4 F5 B5 F6 B6 F7 B7 S1",
    ],
}


@pytest.mark.parametrize("method", ["gpipe", "1f1b", "pipedream", "pipeoptim", "spectrain", "none", "2bw"])
def test_exact_actions_per_method_n4_m4(method: str) -> None:
    info = get_method(method)
    micro = 4 if info.micro_batched else 1
    steps_every = micro if info.policy == "2bw" else 1
    mini_batches = 4 if micro == 1 else 2
    lists = actions(info.schedule, 4, mini_batches, micro, steps_every)
    key = method if method in EXACT else "async"
    assert [" ".join(str(a) for a in acts) for acts in lists] == EXACT[key]
    # each stage generates its own list alone
    for k in range(4):
        alone = schedule_for(k, info.schedule, 4, micro, steps_every)
        own = [a for _ in range(mini_batches) for a in alone.on_mini_batch()] + alone.on_flush()
        assert own == lists[k]


def test_action_str_round_trip() -> None:
    for acts in actions("async-1f1b", 4, 3, micro_batches=4, steps_every=4):
        assert [Action.from_str(str(a)) for a in acts] == acts
    assert Action.from_str("F3(s=2)") == Action(Op.FORWARD, 3, 2)
    assert Action.from_str("S1").op is Op.STEP and str(Op.BACKWARD) == "B"
    for bad in ("X1", "F", "B3(s=1)", "F3(s=)", " F3"):
        with pytest.raises(ValueError, match="not an action"):
            Action.from_str(bad)


@pytest.mark.parametrize(
    "kind, steps_every", [("gpipe", 1), ("1f1b", 1), ("async-1f1b", 1), ("async-1f1b", 4)]
)
@pytest.mark.parametrize("stages", [2, 4])
def test_the_tail_stage_0_may_leave_to_its_next_call_is_its_last_backward_and_step(
    kind: str, steps_every: int, stages: int
) -> None:
    """What :meth:`StageProcess.submit` leaves to the next call under torchrun: from the last
    backward of each call's actions on, where only a step follows it; the actions run in the
    same order, the next call's first."""
    micro = 4 if kind != "async-1f1b" or steps_every > 1 else 1
    schedule = schedule_for(0, kind, stages, micro, steps_every)
    ran, left = [], []
    for _ in range(3 * stages):
        now = left + schedule.on_mini_batch()
        cut = deferred_tail(now)
        ran, left = ran + now[:cut], now[cut:]
        backwards = [a for a in now if a.op == BACKWARD]
        if backwards:  # the last backward and at most its step wait; nothing else does
            assert left[0] == backwards[-1] and all(a.op == STEP for a in left[1:])
        else:  # the asynchronous warm-up: forwards alone
            assert left == []
    expected = actions(kind, stages, 3 * stages, micro, steps_every)[0]
    assert ran + left + schedule.on_flush() == expected


def test_a_list_whose_last_backward_is_followed_by_a_forward_leaves_nothing() -> None:
    stage_actions = [Action(FORWARD, 0), Action(BACKWARD, 0), Action(FORWARD, 1)]
    assert deferred_tail(stage_actions) == len(stage_actions)
    assert deferred_tail([]) == 0
