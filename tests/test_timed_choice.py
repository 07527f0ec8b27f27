"""TimedChoice: every option timed in turn, then the one of lowest median kept."""

from __future__ import annotations

import time

import pytest
import torch

from pipeoptim.compiler.profile import work_clock
from pipeoptim.runtime.timed_choice import TimedChoice


class FakeClock:
    """Seconds that the work advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_option_in_turn_then_the_lowest_median() -> None:
    clock = FakeClock()
    # "b" is slower on most calls but once far faster, "a" once far slower: medians decide
    costs = {"a": [1.0, 9.0, 1.0, 1.0], "b": [2.0, 0.25, 2.0, 2.0]}
    seen: list[str] = []

    def work(option: str) -> str:
        clock.now += costs[option][sum(o == option for o in seen)]
        seen.append(option)
        return option.upper()

    choice = TimedChoice(("a", "b"), trials=4, clock=clock)
    results = [choice.run(work) for _ in range(8)]
    assert seen == ["a", "b"] * 4 and results == [o.upper() for o in seen]
    assert choice.chosen == "a" and choice.medians == (1.0, 2.0)
    costs["a"] += [5.0] * 3  # slower from now on: the choice stays
    assert [choice.run(work) for _ in range(3)] == ["A"] * 3 and seen[8:] == ["a"] * 3


def test_undecided_until_every_option_is_timed_and_a_lone_option_untimed() -> None:
    clock = FakeClock()
    choice = TimedChoice((True, False), trials=2, clock=clock)
    for _ in range(3):
        choice.run(lambda option: None)
        assert choice.chosen is None and choice.medians == ()
    choice.run(lambda option: None)
    assert choice.chosen is True  # a tie: the first option

    def never() -> float:
        raise AssertionError("the clock is not read for a lone option")

    lone = TimedChoice((False,), clock=never)
    assert lone.chosen is False
    assert [lone.run(lambda option: option) for _ in range(3)] == [False] * 3


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one option"):
        TimedChoice(())
    with pytest.raises(ValueError, match="trials must be at least 1"):
        TimedChoice((1, 2), trials=0)


def test_the_work_clock_is_cpu_time_with_one_thread() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert work_clock() is time.thread_time
        torch.set_num_threads(2)
        assert work_clock() is time.perf_counter
    finally:
        torch.set_num_threads(before)


def test_warmup_calls_run_the_first_option_untimed() -> None:
    clock = FakeClock()
    seen: list[str] = []

    def work(option: str) -> None:
        clock.now += {"a": 3.0, "b": 1.0}[option] * (10 if not seen else 1)  # the first call is slow
        seen.append(option)

    choice = TimedChoice(("a", "b"), trials=1, clock=clock, warmup=1)
    for _ in range(4):
        choice.run(work)
    assert seen == ["a", "a", "b", "b"] and choice.medians == (3.0, 1.0) and choice.chosen == "b"
    for bad in (-1, 0.5):  # a fraction never counted down to 0: the choice was never made
        with pytest.raises(ValueError, match="warmup must be a whole number"):
            TimedChoice((1, 2), warmup=bad)
