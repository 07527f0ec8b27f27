"""Pipeline schedules as plain lists of actions, generated per stage.

An :class:`Action` is a forward (``F``) or backward (``B``) pass of one micro-batch, or an
optimizer step (``S``) (:class:`Op`). Each stage (each rank) generates only its own actions
(:func:`schedule_for`), *online*: :meth:`Schedule.on_mini_batch` returns the actions the stage
appends when the next mini-batch arrives and :meth:`Schedule.on_flush` those that drain the
pipeline, so a training loop that does not know its length in advance runs exactly the lists
:func:`actions` prints.

- ``gpipe`` (Huang et al., NeurIPS 2019): all forwards of the mini-batch's M micro-batches,
  then all backwards, then one step (flush every mini-batch).
- ``1f1b`` (PipeDream-Flush, Narayanan et al. SC 2021 / Megatron-LM): stage k of N (0-based)
  runs a warm-up of ``min(N-k-1, M)`` forwards, then one forward and one backward in turn
  (steady state), then the remaining backwards (cool-down), then one step. N = 4, M = 4::

      stage 0: F0 F1 F2 F3 B0 B1 B2 B3 S0      warm-up F0 F1 F2, steady F3 B0, cool-down B1 B2 B3
      stage 1: F0 F1 F2 B0 F3 B1 B2 B3 S0
      stage 2: F0 F1 B0 F2 B1 F3 B2 B3 S0
      stage 3: F0 B0 F1 B1 F2 B2 F3 B3 S0      no warm-up at the last stage

- ``async-1f1b`` (PipeDream, Narayanan et al. SOSP 2019): the same pattern over an endless
  stream of mini-batches with no flush; every stage steps its optimizer after each backward.
  With ``steps_every=M`` (PipeDream-2BW) the stream is of micro-batches and the step follows
  every M-th backward.

Each forward carries its *version difference*: the number of optimizer steps the stage takes
between that forward and the backward of the same micro-batch. In the steady state of
``async-1f1b`` it is ``N - k - 1`` at stage k (0-based); PipeOptim (arXiv:2312.00839) writes
``s = D - rank - 1``, while its published code uses ``world_size - rank``. Here it is counted
from the schedule itself (:func:`count_version_differences`), so it is also right in the
warm-up after a flush, where fewer steps intervene.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Op(str, Enum):
    """What an action does: ``F`` forward, ``B`` backward, ``S`` optimizer step."""

    FORWARD = "F"
    BACKWARD = "B"
    STEP = "S"

    def __str__(self) -> str:
        return self.value


FORWARD, BACKWARD, STEP = Op.FORWARD, Op.BACKWARD, Op.STEP
_ACTION = re.compile(r"([FBS])(\d+)(?:\(s=(\d+)\))?")


@dataclass(frozen=True)
class Action:
    """One unit of work of one stage; ``str(action)`` is ``F3``, ``F3(s=2)``, ``B3`` or ``S1``
    and :meth:`from_str` reads it back.

    Attributes:
        op: forward, backward or optimizer step.
        micro_batch: global index of the micro-batch (F and B); for S, the index of the step.
        version_diff: for F, optimizer steps between this forward and its backward.
    """

    op: Op
    micro_batch: int
    version_diff: int = 0

    def __str__(self) -> str:
        if self.op == FORWARD and self.version_diff:
            return f"F{self.micro_batch}(s={self.version_diff})"
        return f"{self.op}{self.micro_batch}"

    @classmethod
    def from_str(cls, text: str) -> Action:
        """The action ``str(action)`` wrote.

        Raises:
            ValueError: ``text`` is not ``F<n>``, ``F<n>(s=<n>)``, ``B<n>`` or ``S<n>``.
        """
        match = _ACTION.fullmatch(text)
        if match is None or (match[3] is not None and match[1] != "F"):
            raise ValueError(f"not an action: {text!r} (expected F3, F3(s=2), B3 or S1)")
        return cls(Op(match[1]), int(match[2]), int(match[3] or 0))


class Schedule:
    """Online generator of one stage's actions (see the module docstring); build it with
    :func:`schedule_for`.

    Args:
        kind: ``"gpipe"``, ``"1f1b"`` or ``"async-1f1b"``.
        num_stages: N.
        stage: k, this stage (0-based).
        micro_batches: M, micro-batches per mini-batch.
        steps_every: for ``async-1f1b``, step after every ``steps_every``-th backward
            (1 for PipeDream and PipeOptim, M for PipeDream-2BW).

    Raises:
        ValueError: unknown kind, non-positive counts, or a stage outside ``0..N-1``.
    """

    KINDS = ("gpipe", "1f1b", "async-1f1b")

    def __init__(
        self, kind: str, num_stages: int, stage: int, micro_batches: int = 1, steps_every: int = 1
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(self.KINDS)}")
        if num_stages < 1 or micro_batches < 1 or steps_every < 1:
            raise ValueError("num_stages, micro_batches and steps_every must be positive")
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} is not one of the {num_stages} stages (0..{num_stages - 1})")
        self.kind = kind
        self.num_stages = num_stages
        self.stage = stage
        self.micro_batches = micro_batches
        self.steps_every = steps_every
        self._next_micro_batch = 0
        self._steps = 0
        # async state: micro-batches forwarded / backwarded since the last flush
        self._segment_start = 0
        self._forwarded = 0
        self._backwarded = 0
        self._since_step = 0

    @property
    def asynchronous(self) -> bool:
        return self.kind == "async-1f1b"

    @property
    def warmup(self) -> int:
        """Forwards this stage runs before its first backward: ``N - k - 1``."""
        return self.num_stages - self.stage - 1

    def resume(self, mini_batches: int, steps: int) -> None:
        """Continue numbering after ``mini_batches`` mini-batches and ``steps`` steps, with an
        empty pipeline (as after a flush; used when training resumes from a checkpoint)."""
        self._next_micro_batch = self._segment_start = mini_batches * self.micro_batches
        self._forwarded = 0
        self._backwarded = 0
        self._since_step = 0
        self._steps = steps

    def on_mini_batch(self, count: int | None = None) -> list[Action]:
        """Actions this stage runs once the next mini-batch has arrived.

        Args:
            count: micro-batches of this mini-batch (default M); a smaller last mini-batch
                of ``gpipe`` or ``1f1b`` runs fewer, numbered ``mini_batch * M + j`` still.

        Raises:
            ValueError: ``count`` outside ``1..M``, or below M for ``async-1f1b``.
        """
        count = self.micro_batches if count is None else count
        if not 1 <= count <= self.micro_batches or (self.asynchronous and count != self.micro_batches):
            raise ValueError(
                f"a mini-batch of {self.kind} runs 1..{self.micro_batches} micro-batches, not {count}"
            )
        first = self._next_micro_batch
        self._next_micro_batch += self.micro_batches
        mbs = list(range(first, first + count))
        if self.kind == "gpipe":
            return self._sync(mbs, mbs)
        if self.kind == "1f1b":
            return self._one_f_one_b(mbs)
        out: list[Action] = []
        for mb in mbs:
            j = mb - self._segment_start
            self._forwarded += 1
            out.append(Action(FORWARD, mb, self._version_diff(j, self._backwarded)))
            if j >= self.warmup:
                out += self._backward_and_step()
        return out

    def on_flush(self) -> list[Action]:
        """Actions that drain the pipeline (asynchronous schedules; empty for the others)."""
        out: list[Action] = []
        if not self.asynchronous:
            return out
        while self._backwarded < self._forwarded:
            out += self._backward_and_step()
        if self._since_step:
            out.append(self._step())
        self._segment_start = self._next_micro_batch
        self._forwarded = 0
        self._backwarded = 0
        return out

    # -- helpers ---------------------------------------------------------------------

    def _step(self) -> Action:
        self._steps += 1
        self._since_step = 0
        return Action(STEP, self._steps - 1)

    def _backward_and_step(self) -> list[Action]:
        mb = self._segment_start + self._backwarded
        self._backwarded += 1
        self._since_step += 1
        actions = [Action(BACKWARD, mb)]
        if self._since_step == self.steps_every:
            actions.append(self._step())
        return actions

    def _version_diff(self, j: int, backwarded: int) -> int:
        """Steps between F of the segment's j-th micro-batch and its B at this stage.

        The backwards ``backwarded .. j-1`` run in between (F is issued before the backward
        that arrives with it); a step follows every ``steps_every``-th backward, counted from
        the last step.
        """
        between = j - backwarded
        return (self._since_step + between) // self.steps_every

    def _sync(self, forwards: list[int], backwards: list[int]) -> list[Action]:
        actions = [Action(FORWARD, mb) for mb in forwards] + [Action(BACKWARD, mb) for mb in backwards]
        return [*actions, self._step()]

    def _one_f_one_b(self, mbs: list[int]) -> list[Action]:
        warm = min(self.warmup, len(mbs))
        actions = [Action(FORWARD, mb) for mb in mbs[:warm]]
        for i, mb in enumerate(mbs[warm:]):
            actions += [Action(FORWARD, mb), Action(BACKWARD, mbs[i])]
        actions += [Action(BACKWARD, mb) for mb in mbs[len(mbs) - warm :]]
        return [*actions, self._step()]


def schedule_for(
    stage: int, kind: str, num_stages: int, micro_batches: int = 1, steps_every: int = 1
) -> Schedule:
    """The schedule of stage ``stage`` alone (what one rank generates); see :class:`Schedule`."""
    return Schedule(kind, num_stages, stage, micro_batches, steps_every)


def actions(
    kind: str, num_stages: int, num_mini_batches: int, micro_batches: int = 1, steps_every: int = 1
) -> list[list[Action]]:
    """The complete per-stage action lists for ``num_mini_batches`` mini-batches and a flush."""
    lists: list[list[Action]] = []
    for stage in range(num_stages):
        schedule = schedule_for(stage, kind, num_stages, micro_batches, steps_every)
        stage_actions: list[Action] = []
        for _ in range(num_mini_batches):
            stage_actions += schedule.on_mini_batch()
        lists.append(stage_actions + schedule.on_flush())
    return lists


def last_before_step(stage_actions: list[Action], i: int) -> bool:
    """Whether action ``i`` of a stage's list is a backward the optimizer step follows (its
    gradients are then final: the replicas' all-reduce may start during it)."""
    nxt = stage_actions[i + 1] if i + 1 < len(stage_actions) else None
    return stage_actions[i].op == BACKWARD and nxt is not None and nxt.op == STEP


def deferred_tail(stage_actions: list[Action]) -> int:
    """Where the actions a stage may leave to its next call begin: at its last backward,
    where only optimizer steps follow it (``len(stage_actions)``: nowhere).

    Under torchrun stage 0 runs in the thread that calls ``step()``; its last backward of a
    mini-batch waits for the gradients of the round trip through the later stages, and the
    work of the next ``step()`` call (the user's data loading, the checks of the batch, its
    size message) can run in that wait instead of after the step
    (:meth:`pipeoptim.runtime.worker.StageProcess.submit`). The order of the actions is the same.
    """
    backwards = [i for i, a in enumerate(stage_actions) if a.op == BACKWARD]
    if not backwards or any(a.op != STEP for a in stage_actions[backwards[-1] + 1 :]):
        return len(stage_actions)
    return backwards[-1]


def count_version_differences(stage_actions: list[Action]) -> dict[int, int]:
    """Count, for each forward in one stage's list, the steps before its backward."""
    result: dict[int, int] = {}
    open_forwards: dict[int, int] = {}
    steps = 0
    for action in stage_actions:
        if action.op == FORWARD:
            open_forwards[action.micro_batch] = steps
        elif action.op == BACKWARD:
            result[action.micro_batch] = steps - open_forwards.pop(action.micro_batch)
        else:
            steps += 1
    return result


def format_actions(lists: list[list[Action]]) -> str:
    """One line per stage: ``stage 0: F0 F1 F2 B0 S0 ...``."""
    return "\n".join(f"stage {k}: " + " ".join(str(a) for a in acts) for k, acts in enumerate(lists))
