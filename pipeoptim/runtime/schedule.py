"""Pipeline schedules as plain lists of actions, one list per stage.

An :class:`Action` is a forward (``F``) or backward (``B``) pass of one micro-batch, or an
optimizer step (``S``). Schedules are generated *online*: :meth:`Schedule.on_mini_batch`
returns the actions each stage appends when the next mini-batch arrives and
:meth:`Schedule.on_flush` those that drain the pipeline, so a training loop that does not
know its length in advance runs exactly the lists :func:`actions` prints.

- ``gpipe`` (Huang et al., NeurIPS 2019): all forwards of the mini-batch's M micro-batches,
  then all backwards, then one step (flush every mini-batch).
- ``1f1b`` (PipeDream-Flush, Narayanan et al. SC 2021 / Megatron-LM): stage k of N (0-based)
  runs a warm-up of ``min(N-k-1, M)`` forwards, then one forward and one backward in turn
  (steady state), then the remaining backwards (cool-down), then one step.
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

from dataclasses import dataclass

FORWARD, BACKWARD, STEP = "F", "B", "S"


@dataclass(frozen=True)
class Action:
    """One unit of work of one stage.

    Attributes:
        op: ``"F"`` forward, ``"B"`` backward, ``"S"`` optimizer step.
        micro_batch: global index of the micro-batch (F and B); for S, the index of the step.
        version_diff: for F, optimizer steps between this forward and its backward.
    """

    op: str
    micro_batch: int
    version_diff: int = 0

    def __str__(self) -> str:
        if self.op == FORWARD and self.version_diff:
            return f"F{self.micro_batch}(s={self.version_diff})"
        return f"{self.op}{self.micro_batch}"


class Schedule:
    """Online generator of per-stage action lists (see the module docstring).

    Args:
        kind: ``"gpipe"``, ``"1f1b"`` or ``"async-1f1b"``.
        num_stages: N.
        micro_batches: M, micro-batches per mini-batch.
        steps_every: for ``async-1f1b``, step after every ``steps_every``-th backward
            (1 for PipeDream and PipeOptim, M for PipeDream-2BW).

    Raises:
        ValueError: unknown kind or non-positive counts.
    """

    KINDS = ("gpipe", "1f1b", "async-1f1b")

    def __init__(self, kind: str, num_stages: int, micro_batches: int = 1, steps_every: int = 1) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(self.KINDS)}")
        if num_stages < 1 or micro_batches < 1 or steps_every < 1:
            raise ValueError("num_stages, micro_batches and steps_every must be positive")
        self.kind = kind
        self.num_stages = num_stages
        self.micro_batches = micro_batches
        self.steps_every = steps_every
        self._next_micro_batch = 0
        self._steps = [0] * num_stages
        # async state, per stage: micro-batches forwarded / backwarded since the last flush
        self._segment_start = 0
        self._forwarded = 0
        self._backwarded = [0] * num_stages
        self._since_step = [0] * num_stages

    @property
    def asynchronous(self) -> bool:
        return self.kind == "async-1f1b"

    def resume(self, mini_batches: int, steps: int) -> None:
        """Continue numbering after ``mini_batches`` mini-batches and ``steps`` steps, with an
        empty pipeline (as after a flush; used when training resumes from a checkpoint)."""
        self._next_micro_batch = self._segment_start = mini_batches * self.micro_batches
        self._forwarded = 0
        self._backwarded = [0] * self.num_stages
        self._since_step = [0] * self.num_stages
        self._steps = [steps] * self.num_stages

    def warmup(self, stage: int) -> int:
        """Forwards stage ``stage`` runs before its first backward: ``N - k - 1``."""
        return self.num_stages - stage - 1

    def on_mini_batch(self, count: int | None = None) -> list[list[Action]]:
        """Actions each stage runs once the next mini-batch has arrived.

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
            return [self._sync(stage, mbs, mbs) for stage in range(self.num_stages)]
        if self.kind == "1f1b":
            return [self._one_f_one_b(stage, mbs) for stage in range(self.num_stages)]
        out: list[list[Action]] = [[] for _ in range(self.num_stages)]
        for mb in mbs:
            j = mb - self._segment_start
            self._forwarded += 1
            for stage in range(self.num_stages):
                w = self.warmup(stage)
                done = self._backwarded[stage]
                out[stage].append(Action(FORWARD, mb, self._version_diff(stage, j, done)))
                if j >= w:
                    out[stage] += self._backward_and_step(stage)
        return out

    def on_flush(self) -> list[list[Action]]:
        """Actions that drain the pipeline (asynchronous schedules; empty for the others)."""
        out: list[list[Action]] = [[] for _ in range(self.num_stages)]
        if not self.asynchronous:
            return out
        for stage in range(self.num_stages):
            while self._backwarded[stage] < self._forwarded:
                out[stage] += self._backward_and_step(stage)
            if self._since_step[stage]:
                out[stage].append(self._step(stage))
        self._segment_start = self._next_micro_batch
        self._forwarded = 0
        self._backwarded = [0] * self.num_stages
        return out

    # -- helpers ---------------------------------------------------------------------

    def _step(self, stage: int) -> Action:
        self._steps[stage] += 1
        self._since_step[stage] = 0
        return Action(STEP, self._steps[stage] - 1)

    def _backward_and_step(self, stage: int) -> list[Action]:
        mb = self._segment_start + self._backwarded[stage]
        self._backwarded[stage] += 1
        self._since_step[stage] += 1
        actions = [Action(BACKWARD, mb)]
        if self._since_step[stage] == self.steps_every:
            actions.append(self._step(stage))
        return actions

    def _version_diff(self, stage: int, j: int, backwarded: int) -> int:
        """Steps between F of the segment's j-th micro-batch and its B at ``stage``.

        The backwards ``backwarded .. j-1`` run in between (F is issued before the backward
        that arrives with it); a step follows every ``steps_every``-th backward, counted from
        the last step.
        """
        between = j - backwarded
        return (self._since_step[stage] + between) // self.steps_every

    def _sync(self, stage: int, forwards: list[int], backwards: list[int]) -> list[Action]:
        actions = [Action(FORWARD, mb) for mb in forwards] + [Action(BACKWARD, mb) for mb in backwards]
        return [*actions, self._step(stage)]

    def _one_f_one_b(self, stage: int, mbs: list[int]) -> list[Action]:
        warm = min(self.warmup(stage), len(mbs))
        actions = [Action(FORWARD, mb) for mb in mbs[:warm]]
        for i, mb in enumerate(mbs[warm:]):
            actions += [Action(FORWARD, mb), Action(BACKWARD, mbs[i])]
        actions += [Action(BACKWARD, mb) for mb in mbs[len(mbs) - warm :]]
        return [*actions, self._step(stage)]


def actions(
    kind: str, num_stages: int, num_mini_batches: int, micro_batches: int = 1, steps_every: int = 1
) -> list[list[Action]]:
    """The complete per-stage action lists for ``num_mini_batches`` mini-batches and a flush."""
    schedule = Schedule(kind, num_stages, micro_batches, steps_every)
    lists: list[list[Action]] = [[] for _ in range(num_stages)]
    for _ in range(num_mini_batches):
        for stage, new in enumerate(schedule.on_mini_batch()):
            lists[stage] += new
    for stage, new in enumerate(schedule.on_flush()):
        lists[stage] += new
    return lists


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
