"""The action timer's parts add up to the action loop's time and each lands in its own part."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pipeoptim.runtime.action_timer import PARTS, ActionTimer, instrument

_clock = [0.0]  # a fake clock: the timings are exact whatever the machine's load


def _busy(seconds: float) -> None:
    _clock[0] += seconds


class _Policy:
    def begin_forward(self, *args: object) -> None:
        _busy(0.004)  # a prediction inside the stage's forward

    def end_forward(self, *args: object) -> None: ...
    def begin_backward(self, *args: object) -> None: ...
    def end_backward(self, *args: object) -> None: ...

    def before_step(self) -> None:
        _busy(0.002)  # a stash copy inside the step

    def after_step(self) -> None: ...


class _Stage:
    def __init__(self) -> None:
        self.policy = _Policy()

    def forward(self) -> None:
        self.policy.begin_forward()
        _busy(0.010)
        self.policy.end_forward()

    def backward(self) -> None:
        self.policy.begin_backward()
        _busy(0.020)
        self.policy.end_backward()

    def step(self) -> None:
        self.policy.before_step()
        _busy(0.003)
        self.policy.after_step()


class _Channel:
    def _wait(self) -> None:
        _busy(0.005)

    def isend(self) -> None:
        _busy(0.001)

    def prefetch(self) -> None: ...
    def end_action(self) -> None: ...


class _Process:
    """The shape of StageProcess the timer relies on."""

    def __init__(self) -> None:
        self.stage = _Stage()
        self.channel = _Channel()

    def _run(
        self, actions: list[str], side_work: Callable[[], None] | None = None, stop: int | None = None
    ) -> None:
        for op in actions[:stop]:  # the rest left to the next call (stage 0 under torchrun)
            _busy(0.0005)  # the loop's own Python
            if op == "F":
                self.channel._wait()
                self.stage.forward()
                self.channel.isend()
            elif op == "B":
                self.stage.backward()
            else:
                self.stage.step()
            self.channel.end_action()


def test_parts_add_up_and_land_where_they_belong() -> None:
    """On the clock given (the benchmark's ``--clock cpu`` gives ``time.thread_time``; the
    wall clock by default)."""
    assert ActionTimer().clock is time.perf_counter
    process = _Process()
    timer = instrument(process, lambda: _clock[0])
    process._run(["F", "B", "S"])  # a warm-up, forgotten
    timer.reset()
    start = _clock[0]
    process._run(["F", "B", "S"] * 4)
    total = _clock[0] - start
    parts = timer.breakdown()
    assert list(parts) == list(PARTS)
    assert timer.actions == 12
    assert sum(parts.values()) == pytest.approx(total, abs=1e-12)
    expected = {"forward": 0.040, "backward": 0.080, "weights": 0.024, "step": 0.012}
    expected |= {"recv wait": 0.020, "send": 0.004, "overhead": 0.006}
    assert parts == pytest.approx(expected, abs=1e-12)
    process._run(["B", "S", "F", "B", "S"], None, 3)  # B S of the last call, F; B S left
    assert timer.actions == 15
