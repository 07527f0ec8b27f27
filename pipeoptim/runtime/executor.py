"""Executors run the schedule's actions on the stages.

:func:`run_action` is the one place an action is carried out; executors differ only in how
values travel between stages (:class:`Channel`): in memory for the deterministic
:class:`LocalExecutor`, through ``torch.distributed`` for the workers in
:mod:`pipeoptim.runtime.worker`. Both therefore compute the same numbers."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

from pipeoptim.errors import SAVED_THEN_CHANGED, PipelineStalledError
from pipeoptim.loss_check import HELD_BYTES
from pipeoptim.microbatch import Rows, note_where
from pipeoptim.runtime import stage_state as states
from pipeoptim.runtime.async_norms import step_async
from pipeoptim.runtime.delivery import delivered, forward_chain
from pipeoptim.runtime.grad_modes import training_modes
from pipeoptim.runtime.one_driver import OneDriver
from pipeoptim.runtime.procmem import resident_bytes
from pipeoptim.runtime.scaler import norm_share, step_together
from pipeoptim.runtime.schedule import BACKWARD, FORWARD, STEP, Action, Schedule
from pipeoptim.runtime.shared import finish_shared_grads
from pipeoptim.runtime.stage import StageRuntime
from pipeoptim.runtime.staleness import PredictionError


@dataclass
class MiniBatch:
    """One mini-batch split into micro-batches.

    Attributes:
        index: position of the mini-batch in the stream (0-based).
        inputs: model inputs of each micro-batch (stage 0 reads them).
        targets: targets of each micro-batch (the last stage reads them).
        scales: share of each micro-batch in the mini-batch (its loss factor).
        sizes: batch size of each micro-batch.
        hyper: the user's optimizer hyperparameters for this mini-batch.
        whole, offset: with replicas, every micro-batch's size and this share's first place.
    """

    index: int
    inputs: list[tuple[Any, ...]]
    targets: list[Any]
    scales: list[float]
    sizes: list[int]
    hyper: list[dict] = field(default_factory=list)
    whole: tuple[int, ...] = ()
    offset: int = 0

    def split(self) -> tuple[int, ...]:  # every micro-batch's rows, the other replicas' too
        return self.whole or tuple(map(int, self.sizes))


@dataclass(frozen=True)
class MicroBatch:
    """What the driver gives a stage for one micro-batch (it never travels between stages).

    Attributes:
        index: global index of the micro-batch (``mini_batch · M + j``).
        mini_batch: index of its mini-batch.
        scale: its share of the mini-batch loss (:mod:`pipeoptim.microbatch`).
        inputs: the model inputs (stage 0 only, else ``None``).
        targets: the targets (the last stage only, else ``None``).
        where: mini-batch, place j in it, every micro-batch's rows (:func:`~pipeoptim.microbatch.describe`).
    """

    index: int
    mini_batch: int
    scale: float
    inputs: tuple[Any, ...] | None = None
    targets: Any = None
    where: tuple[int, int, tuple[int, ...]] = (0, 0, ())


class Channel(Protocol):
    """How a stage receives and sends values between stages (transport only)."""

    def inputs(self, micro_batch: int) -> Sequence[Any]: ...
    def send_activations(self, micro_batch: int, values: Any) -> None: ...
    def grads(self, micro_batch: int) -> Sequence[Any]: ...
    def send_grads(self, micro_batch: int, grads: Sequence[Any]) -> None: ...
    def loss(self, micro_batch: int, value: torch.Tensor) -> None: ...
    def total_squared_grad_norm(self, own: float) -> float: ...
    def send_note(self, op: str, micro_batch: int, note: torch.Tensor) -> None: ...
    def note(self, op: str, micro_batch: int) -> torch.Tensor: ...
    def post_shared(self, round_: int, parts: list[torch.Tensor]) -> None: ...
    def collect_shared(self, round_: int) -> list[list[torch.Tensor]]: ...


class StageState:
    """Bookkeeping of one stage between actions: the micro-batches given to it and not yet
    forwarded (:class:`MicroBatch`), where each forwarded one awaiting its backward sits in its
    mini-batch (``MicroBatch.where``), and the micro-batch of its last backward."""

    def __init__(self) -> None:
        self.given: dict[int, MicroBatch] = {}
        self.in_flight: dict[int, tuple[int, int, tuple[int, ...]]] = {}
        self.last_backward: int | None = None
        self.grads_final = False  # this step's shared gradients are summed already (local)


def run_action(stage: StageRuntime, action: Action, channel: Channel, state: StageState) -> None:
    """Carry out ``action`` on ``stage``, reading and writing values through ``channel``
    (with the notes of :mod:`pipeoptim.runtime.async_norms` where the stage has them)."""
    mb = action.micro_batch
    norms = stage.async_norms
    if action.op == FORWARD:
        given = state.given.pop(mb)
        state.in_flight[mb] = given.where
        inputs = given.inputs if stage.index == 0 else channel.inputs(mb)
        targets = given.targets if stage.is_last else None
        if stage.loss_check is not None:
            stage.loss_check.where = given.where
        if norms is not None:
            norms.before_forward(stage, mb, channel.note("act", mb) if stage.index > 0 else None)
        try:
            out = stage.forward(mb, inputs, targets, action.version_diff, given.scale, given.mini_batch)
        except Exception as exc:
            _add_where(exc, f"stage {stage.index}'s forward", given.where)
            raise
        if stage.is_last:
            channel.loss(mb, out)
        else:
            channel.send_activations(mb, out)
            if norms is not None:
                channel.send_note("act", mb, norms.forward_note())
    elif action.op == BACKWARD:
        grads = None if stage.is_last else channel.grads(mb)
        where = state.in_flight.pop(mb)
        try:
            result = stage.backward(mb, grads)
        except Exception as exc:
            _add_where(exc, f"stage {stage.index}'s backward", where)
            raise
        if norms is not None:
            note = norms.after_backward(stage, mb, None if stage.is_last else channel.note("grad", mb))
        if stage.index > 0:
            channel.send_grads(mb, result)
            if norms is not None:
                channel.send_note("grad", mb, note)
        if stage.loss_check is not None:  # the gradients are on their way: off the critical path
            stage.loss_check.check_pending(HELD_BYTES, "after a backward")
        state.last_backward = mb
    else:
        if stage.loss_check is not None:  # all of this mini-batch's, before its step
            stage.loss_check.check_pending(0, "before the optimizer step")
        if stage.reduce_gradients is not None:  # over the replicas first, then over the holders
            stage.reduce_gradients(stage.trainable())
        if stage.shared is not None and not state.grads_final:  # else summed for the norm
            stage.shared.set_grads(channel)
        state.grads_final = True  # until the step is taken (the norm may be taken meanwhile)
        if norms is not None:
            assert state.last_backward is not None
            step_async(stage, state.last_backward)
        elif stage.steps_together:
            step_together(stage, channel.total_squared_grad_norm, state.last_backward)
        else:
            stage.step(state.last_backward)
        state.grads_final = False


def _add_where(exc: Exception, action: str, where: tuple[int, int, tuple[int, ...]]) -> None:
    """Note on ``exc`` (Python 3.11 notes; none before) the action that raised it and its
    micro-batch's place and rows (``MicroBatch.where``, :func:`pipeoptim.microbatch.note_where`)."""
    note_where(exc, action, where)
    if hasattr(exc, "add_note") and "modified by an inplace operation" in str(exc):
        exc.add_note(SAVED_THEN_CHANGED)


class _Mailbox:
    """In-memory channel of the local executor."""

    def __init__(self, executor: LocalExecutor, stage: int) -> None:
        self.ex = executor
        self.stage = stage

    def inputs(self, micro_batch: int) -> Sequence[Any]:
        return self.ex.activations.pop((self.stage, micro_batch))

    def send_activations(self, micro_batch: int, values: Any) -> None:
        self.ex.count_sent(self.stage, values)
        self.ex.activations[(self.stage + 1, micro_batch)] = delivered(values)

    def grads(self, micro_batch: int) -> Sequence[Any]:
        return self.ex.gradients.pop((self.stage, micro_batch))

    def send_grads(self, micro_batch: int, grads: Sequence[Any]) -> None:
        self.ex.count_sent(self.stage, grads)
        self.ex.gradients[(self.stage - 1, micro_batch)] = delivered(list(grads))

    def loss(self, micro_batch: int, value: torch.Tensor) -> None:
        self.ex.on_loss(micro_batch, value)

    def total_squared_grad_norm(self, own: float) -> float:
        return self.ex.round_squared_norm(self.stage)

    def send_note(self, op: str, micro_batch: int, note: torch.Tensor) -> None:
        self.ex.notes[(op, self.stage + (1 if op == "act" else -1), micro_batch)] = note

    def note(self, op: str, micro_batch: int) -> torch.Tensor:
        return self.ex.notes.pop((op, self.stage, micro_batch))

    def post_shared(self, round_: int, parts: list[torch.Tensor]) -> None:
        self.ex.shared_posts.setdefault(round_, {})[self.stage] = parts

    def collect_shared(self, round_: int) -> list[list[torch.Tensor]]:
        return self.ex.collect_shared(self.stage, round_)


class LocalExecutor(OneDriver):
    """Runs every stage in this process, deterministically.

    Each stage executes its own action list in order; an action waits until the value it
    needs is in memory (the activation of the previous stage, the gradient of the next).
    Any such interleaving gives the same numbers, which are those of the distributed run.

    Args:
        stages: the stage runtimes, in order.
        schedules: the schedule of each stage.
        on_loss: called as ``on_loss(micro_batch, loss)`` when the last stage has a loss.
    """

    def __init__(
        self,
        stages: Sequence[StageRuntime],
        schedules: Sequence[Schedule],
        on_loss: Callable[[int, torch.Tensor], None],
    ) -> None:
        self.stages = list(stages)
        self.schedules = list(schedules)
        self.on_loss = on_loss
        self.queues: list[deque[Action]] = [deque() for _ in self.stages]
        self.states = [StageState() for _ in self.stages]
        self.channels = [_Mailbox(self, k) for k in range(len(self.stages))]
        self.activations: dict[tuple[int, int], Any] = {}
        self.gradients: dict[tuple[int, int], Any] = {}
        #: notes of :mod:`pipeoptim.runtime.async_norms` by ("act"/"grad", receiver, micro-batch)
        self.notes: dict[tuple[str, int, int], torch.Tensor] = {}
        self._clip_total: float | None = None  # Σ‖g_k‖² of the steps being taken together
        self._clip_done: set[int] = set()
        #: shared-parameter gradient parts by round and holder, and who has collected them
        self.shared_posts: dict[int, dict[int, list[torch.Tensor]]] = {}
        self._shared_collected: dict[int, set[int]] = {}
        #: tensor bytes each stage has sent to a neighbour (activations and gradients)
        self._sent = [0] * len(self.stages)

    def submit(self, batch: MiniBatch) -> None:
        """Feed a mini-batch and run every action that can run."""
        first = batch.index * self.schedules[0].micro_batches
        last, rows = len(self.stages) - 1, batch.split()
        for j, (inputs, targets, scale) in enumerate(zip(batch.inputs, batch.targets, batch.scales)):
            for k, (stage, state) in enumerate(zip(self.stages, self.states)):
                state.given[first + j] = MicroBatch(
                    first + j,
                    batch.index,
                    scale,
                    inputs if k == 0 else None,
                    targets if k == last else None,
                    (batch.index, batch.offset + j, rows),
                )
                stage.set_hyperparameters(first + j, batch.hyper)
        self._extend([s.on_mini_batch(len(batch.sizes)) for s in self.schedules])

    def flush(self) -> None:
        """Run the cool-down: every micro-batch in flight finishes its backward."""
        self._extend([s.on_flush() for s in self.schedules])
        if any(self.queues):
            waiting = ", ".join(f"stage {k}: {q[0]}" for k, q in enumerate(self.queues) if q)
            raise PipelineStalledError(
                f"pipeline stalled ({waiting}): the schedule is inconsistent; report it with the "
                "method, the number of stages and of micro-batches"
            )
        for stage, channel in zip(self.stages, self.channels):
            if stage.shared is not None and stage.optimizer is not None:
                stage.shared.drain(channel, stage.optimizer)

    def _extend(self, new: list[list[Action]]) -> None:
        for queue, actions in zip(self.queues, new):
            queue.extend(actions)
        self._run()

    def _ready(self, k: int, action: Action) -> bool:
        mb = action.micro_batch
        if action.op == FORWARD:
            return k == 0 or (k, mb) in self.activations
        if action.op == BACKWARD:
            return k == len(self.stages) - 1 or (k, mb) in self.gradients
        shared = self.stages[k].shared
        if shared is not None and not self.states[k].grads_final:  # else summed for the norm
            shared.post(self.channels[k])
            due = shared.due()
            if due is not None and set(self.shared_posts.get(due, {})) != set(shared.holders):
                return False  # a holder has not posted the round this step applies
        if not self.stages[k].steps_together:
            return True
        # clipping by the global norm: the stages step together, once all have their gradients
        if self._clip_total is not None:
            return k not in self._clip_done
        return all(q and q[0].op == STEP for q in self.queues)

    def round_squared_norm(self, stage: int) -> float:
        """Σ‖g_k‖² over all stages for the steps they are taking together (computed when the
        first of them steps, before any gradient is scaled, from final gradients)."""
        if self._clip_total is None:
            self.finish_shared_grads()
            self._clip_total = sum(norm_share(s) for s in self.stages)
        total = self._clip_total
        self._clip_done.add(stage)
        if len(self._clip_done) == len(self.stages):
            self._clip_total, self._clip_done = None, set()
        return total

    def finish_shared_grads(self) -> None:
        """The summed gradients of the shared parameters, set (:func:`finish_shared_grads`)."""
        finish_shared_grads(self.stages, self.channels, self.states)

    def collect_shared(self, stage: int, round_: int) -> list[list[torch.Tensor]]:
        """Every holder's parts of ``round_``, in stage order (forgotten once all collected)."""
        posts = self.shared_posts[round_]
        done = self._shared_collected.setdefault(round_, set())
        done.add(stage)
        if done == set(posts):
            del self.shared_posts[round_], self._shared_collected[round_]
        return [posts[k] for k in sorted(posts)]

    def count_sent(self, stage: int, values: Any) -> None:
        """Add the bytes of the tensors in ``values`` to what ``stage`` has sent."""
        leaves = [v for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]
        self._sent[stage] += sum(v.numel() * v.element_size() for v in leaves)

    def sent_bytes(self) -> list[int]:
        """Per stage, the tensor bytes it has sent to its neighbours (activations, gradients)."""
        return list(self._sent)

    @training_modes()
    def _run(self) -> None:
        progress = True
        while progress:
            progress = False
            for k, queue in enumerate(self.queues):
                while queue and self._ready(k, queue[0]):
                    action = queue.popleft()
                    run_action(self.stages[k], action, self.channels[k], self.states[k])
                    progress = True

    def wait_loss(self, micro_batch: int) -> None:
        """Nothing to wait for: the losses are computed inside :meth:`submit` and :meth:`flush`."""

    def forward_only(
        self, chunks: Sequence[tuple[Any, ...]], sizes: Sequence[Rows] = ()
    ) -> list[tuple[Any, ...]]:
        """Run each chunk of inputs through all stages in evaluation mode (flat outputs);
        ``sizes`` is not needed, as the chunks are here."""
        return [forward_chain([s.module for s in self.stages], chunk) for chunk in chunks]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return states.stage_state(self.stages)

    def stage_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [states.stage_state([s]) for s in self.stages]

    def load_state_dict(self, state: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> None:
        for stage in self.stages:
            states.load_stage_state(stage, state, aliases)

    def optimizer_state(self) -> dict[str, Any]:
        return states.merge_optimizer_states([states.optimizer_state(s) for s in self.stages])

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        for stage in self.stages:
            states.load_optimizer_state(stage, state)

    def resident_bytes(self) -> list[int]:
        """Every stage runs in this process: its resident memory, once per stage, in bytes."""
        return [resident_bytes()] * len(self.stages)

    def peak_weight_versions(self) -> list[int]:
        return [s.policy.peak_versions if s.policy is not None else 1 for s in self.stages]

    def prediction_errors(self) -> list[PredictionError]:
        return [s.prediction_error.result() for s in self.stages]

    def resume(self, mini_batches: int) -> None:
        for schedule in self.schedules:
            schedule.resume(mini_batches, self.stages[0].steps)

    def close(self) -> None:
        """Drop what is in flight; the stages live in this process."""
        for stage in self.stages:
            stage.discard_in_flight()
        self.activations, self.gradients, self.notes = {}, {}, {}

    abort = close  # stops nothing more: a batch this process refuses reaches no stage
