"""Where a stage's time goes: time per part of its actions, from timers around methods.

:func:`instrument` wraps, on one :class:`~pipeoptim.runtime.worker.StageProcess` (instance
attributes only: nothing changes for other processes or stages), the methods that do each
part of an action, and adds up their time in seconds on a clock (the wall clock by default;
``time.thread_time`` gives the CPU time of the stage's own thread, which leaves out the turns
of another rank sharing the core and the blocking waits, and gloo's threads):

==============  ====================================================================
part            what it times
==============  ====================================================================
``forward``     the stage's forward compute (``StageRuntime.forward`` less the policy)
``backward``    its backward compute (``StageRuntime.backward`` less the policy)
``weights``     the weight policy: prediction (PipeOptim, SpecTrain), the copies of
                weight stashing and of 2BW's shadow (``begin_forward``,
                ``begin_backward``, ``before_step``, ``after_step``, ``end_*``)
``step``        ``optimizer.step()`` and its bookkeeping (less the policy; PipeOptim
                with ``torch.optim.SGD`` on the CPU predicts inside the step, so its
                prediction counts here, :mod:`pipeoptim.runtime.fused_step`)
``recv wait``   waiting for received activations or gradients
``send``        posting sends and receives, and retiring sends already posted
``overhead``    the rest of the action loop: Python between the schedule, the channel
                and the stage (the loop's time less every part above)
==============  ====================================================================

The parts add up to the time spent in the stage's action loop (``StageProcess._run``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

PARTS = ("forward", "backward", "weights", "step", "recv wait", "send", "overhead")

_POLICY_METHODS = (
    "begin_forward",
    "end_forward",
    "begin_backward",
    "end_backward",
    "before_step",
    "after_step",
)


class ActionTimer:
    """Accumulated seconds of ``clock`` per timed method, and the number of actions run."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.actions = 0

    def reset(self) -> None:
        """Forget everything timed so far (call after the warm-up)."""
        self.seconds = {}
        self.actions = 0

    def wrap(self, owner: Any, method: str, key: str) -> None:
        """Replace ``owner.method`` (on the instance) by a timed call adding to ``key``."""
        inner: Callable[..., Any] = getattr(owner, method)

        clock = self.clock

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + clock() - start

        setattr(owner, method, timed)

    def breakdown(self) -> dict[str, float]:
        """Seconds per part (:data:`PARTS`); they add up to the action loop's time."""
        s = self.seconds.get
        weights = sum(s(f"policy.{m}", 0.0) for m in _POLICY_METHODS)
        forward_policy = s("policy.begin_forward", 0.0) + s("policy.end_forward", 0.0)
        backward_policy = s("policy.begin_backward", 0.0) + s("policy.end_backward", 0.0)
        step_policy = s("policy.before_step", 0.0) + s("policy.after_step", 0.0)
        parts = {
            "forward": s("stage.forward", 0.0) - forward_policy,
            "backward": s("stage.backward", 0.0) - backward_policy,
            "weights": weights,
            "step": s("stage.step", 0.0) - step_policy,
            "recv wait": s("channel.wait", 0.0),
            "send": s("channel.isend", 0.0) + s("channel.prefetch", 0.0) + s("channel.end_action", 0.0),
        }
        parts["overhead"] = s("loop", 0.0) - sum(parts.values())
        return parts


def instrument(process: Any, clock: Callable[[], float] = time.perf_counter) -> ActionTimer:
    """Time the parts of every action ``process`` (a ``StageProcess``) runs from now on, in
    seconds of ``clock``.

    Returns the :class:`ActionTimer` collecting the seconds; :meth:`ActionTimer.breakdown`
    gives them per part. Timers cost about a microsecond per call.
    """
    timer = ActionTimer(clock)
    stage, channel = process.stage, process.channel
    timer.wrap(stage, "forward", "stage.forward")
    timer.wrap(stage, "backward", "stage.backward")
    timer.wrap(stage, "step", "stage.step")
    if stage.policy is not None:
        for method in _POLICY_METHODS:
            timer.wrap(stage.policy, method, f"policy.{method}")
    timer.wrap(channel, "_wait", "channel.wait")
    timer.wrap(channel, "isend", "channel.isend")
    timer.wrap(channel, "prefetch", "channel.prefetch")
    timer.wrap(channel, "end_action", "channel.end_action")
    run = process._run

    def loop(
        actions: list[Any], side_work: Callable[[], None] | None = None, stop: int | None = None
    ) -> None:
        start = clock()
        try:
            run(actions, side_work, stop)
        finally:
            timer.seconds["loop"] = timer.seconds.get("loop", 0.0) + clock() - start
            timer.actions += len(actions[:stop])  # the rest run in the next call

    process._run = loop
    return timer
