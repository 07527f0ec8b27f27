"""Data × pipeline parallelism: N stages × R replicas of the pipeline.

Rank ``replica · N + stage`` runs ``stage`` of ``replica`` (replica 0 is ranks ``0 .. N−1``,
so a layout with one replica is the plain pipeline). A mini-batch is split into ``R·m``
micro-batches; replica r runs micro-batches ``r·m .. r·m + m − 1`` of them through its
pipeline with the method's schedule, scaled by their share of the whole mini-batch, and before
every optimizer step each stage's replicas sum their gradients
(:mod:`pipeoptim.runtime.allreduce`). The sum is the whole mini-batch's gradient, so GPipe
and 1F1B equal plain training on the whole mini-batch, and with identical gradients and
optimizer states the asynchronous methods make identical predictions (PipeOptim, SpecTrain),
stash identical versions (PipeDream, 2BW) and keep the replicas bit-identical.

**Tied weights** (shared parameters, :mod:`pipeoptim.runtime.shared`): each holder stage
first sums its gradient over its replicas (with the rest of its gradients), then the holders
of each replica sum those parts over the replica's holders in stage order. The sum is
``Σ_holders Σ_replicas``, the whole mini-batch's gradient of the parameter, and every copy on
every rank gets the same bits (each replica adds the same replica-summed parts in the same
order), so the copies stay identical under every method.

BatchNorm running statistics are each replica's own (every replica normalises and tracks its
rows, as DDP with ``broadcast_buffers=False``); the weights and checkpoints are replica 0's.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from pipeoptim.compiler.trace import TracedModel
from pipeoptim.errors import PipelineError, PipelineStalledError
from pipeoptim.microbatch import Rows
from pipeoptim.runtime.allreduce import GroupAllReduce, sum_in_memory
from pipeoptim.runtime.build import PipelineSpec, build_stage
from pipeoptim.runtime.executor import LocalExecutor, MiniBatch
from pipeoptim.runtime.one_driver import OneDriver
from pipeoptim.runtime.scaler import norm_share
from pipeoptim.runtime.schedule import STEP, Action, Schedule
from pipeoptim.runtime.stage import StageRuntime
from pipeoptim.runtime.stage_state import merge_optimizer_states
from pipeoptim.runtime.staleness import PredictionError

LossCallback = Callable[..., None]


def stage_and_replica(rank: int, num_stages: int) -> tuple[int, int]:
    """``(stage, replica)`` of global ``rank``."""
    return rank % num_stages, rank // num_stages


def replica_ranks(stage: int, num_stages: int, replicas: int) -> list[int]:
    """Global ranks of ``stage``'s replicas (the members of its all-reduce group)."""
    return [r * num_stages + stage for r in range(replicas)]


def replica_seed(seed: int, replica: int) -> int:
    """The dropout seed of a replica (replica 0 keeps the user's, so R = 1 is unchanged)."""
    return seed + 1_000_003 * 7919 * replica


def check_layout(gpus: int, data_parallel: int) -> int:
    """N, the stages of ``gpus`` devices as ``data_parallel`` replicas.

    Raises:
        ValueError: ``data_parallel`` is not a positive integer dividing ``gpus``.
    """
    if not isinstance(data_parallel, int) or isinstance(data_parallel, bool) or data_parallel < 1:
        raise ValueError(f"data_parallel must be a positive integer (replicas), got {data_parallel!r}")
    if gpus % data_parallel:
        raise ValueError(
            f"gpus={gpus} cannot hold {data_parallel} equal replicas: use a data_parallel that "
            f"divides gpus (stages = gpus / data_parallel)"
        )
    return gpus // data_parallel


def check_replicated_options(
    data_parallel: int,
    max_grad_norm: float | None,
    batch_norm: str,
    autocast: torch.dtype | None = None,
    asynchronous: bool = False,
) -> None:
    """Refuse what replicas do not support yet.

    Raises:
        ValueError: ``batch_norm="deferred"``, or ``max_grad_norm`` or float16 loss scaling
            with an asynchronous method, with more than one replica.
    """
    if data_parallel > 1 and asynchronous and max_grad_norm is not None:
        raise ValueError(
            "max_grad_norm with data_parallel > 1 needs a method that flushes every mini-batch "
            "(the asynchronous norms are not summed over replicas yet): use method='gpipe' or "
            "'1f1b', or data_parallel=1"
        )
    if data_parallel > 1 and batch_norm == "deferred":
        raise ValueError(
            "batch_norm='deferred' with data_parallel > 1 is not supported yet (the running "
            "statistics would need every replica's rows): use batch_norm='micro-batch'"
        )
    if data_parallel > 1 and asynchronous and autocast is torch.float16:
        raise ValueError(
            "autocast=torch.float16 with data_parallel > 1 needs a method that flushes every "
            "mini-batch (the asynchronous loss scale is not shared by replicas yet): use "
            "method='gpipe' or '1f1b', torch.bfloat16, or data_parallel=1"
        )


def micro_batch_count(batch: int, micro_batches: int, replicas: int) -> int:
    """Micro-batches each replica runs of a mini-batch of ``batch`` rows: ``min(M, batch // R)``.

    Raises:
        PipelineError: fewer rows than replicas.
    """
    if batch < replicas:
        raise PipelineError(
            f"a mini-batch of {batch} rows cannot be split across {replicas} data-parallel replicas: "
            "drop the last incomplete batch (DataLoader(drop_last=True)) or use fewer replicas"
        )
    return max(1, min(micro_batches, batch // replicas))


def replica_part(batch: MiniBatch, replica: int, replicas: int) -> MiniBatch:
    """The micro-batches of ``batch`` (``R·m`` of them) that ``replica`` runs; inputs and
    targets stay empty where ``batch`` has none (ranks that do not read them)."""
    m = len(batch.sizes) // replicas
    part = slice(replica * m, (replica + 1) * m)
    return MiniBatch(
        index=batch.index,
        inputs=batch.inputs[part],
        targets=batch.targets[part],
        scales=batch.scales[part],
        sizes=batch.sizes[part],
        hyper=batch.hyper,
        whole=tuple(map(int, batch.sizes)),
        offset=replica * m,
    )


class _Replica(LocalExecutor):
    """One replica's stages inside :class:`ReplicatedLocalExecutor`: it queues its actions,
    and takes a step only once every replica of that stage is ready to take it."""

    def __init__(
        self,
        group: ReplicatedLocalExecutor,
        replica: int,
        stages: Sequence[StageRuntime],
        schedules: Sequence[Schedule],
        on_loss: LossCallback,
    ) -> None:
        super().__init__(stages, schedules, lambda mb, value: on_loss(mb, value, replica))
        self.group = group
        self.replica = replica

    def _extend(self, new: list[list[Action]]) -> None:
        for queue, actions in zip(self.queues, new):
            queue.extend(actions)

    def _ready(self, k: int, action: Action) -> bool:
        if action.op == STEP:
            if not self.group.may_step(self.replica, k):
                return False
            together = self.stages[k].steps_together and self._clip_total is None
            if together and not self.group.round_open():
                return False  # the round's norm needs every stage of every replica's gradients
            self.group.reduce_round(k)  # before the shared parameters' parts are posted
        return super()._ready(k, action)

    def round_squared_norm(self, stage: int) -> float:
        """The round's Σ‖g_k‖² of the replica-summed gradients, the same for every replica."""
        if self._clip_total is None:
            self._clip_total = self.group.round_total()
        return super().round_squared_norm(stage)


class ReplicatedLocalExecutor(OneDriver):
    """``executor="local"`` for N stages × R replicas: every stage of every replica in this
    process, deterministically, computing what the distributed executors compute.

    Each replica runs its own action lists (:class:`pipeoptim.runtime.executor.LocalExecutor`);
    a stage's step waits until that stage of every replica has reached it, and then, before the
    shared parameters' parts are posted, the gradients of all are summed once
    (:func:`pipeoptim.runtime.allreduce.sum_in_memory`).

    Args:
        replicas: per replica, its stage runtimes in order.
        schedule: ``schedule(stage)`` makes a stage's schedule (the same in every replica).
        on_loss: ``on_loss(micro_batch, loss, replica)``.
    """

    def __init__(
        self,
        replicas: Sequence[Sequence[StageRuntime]],
        schedule: Callable[[int], Schedule],
        on_loss: LossCallback,
    ) -> None:
        self.num_stages = len(replicas[0])
        self.replicas = [
            _Replica(self, r, stages, [schedule(k) for k in range(self.num_stages)], on_loss)
            for r, stages in enumerate(replicas)
        ]
        self._stepped: list[set[int]] = [set() for _ in range(self.num_stages)]
        self._reduced = [False] * self.num_stages
        self._round: tuple[float, int] | None = None  # the round's total, replicas that took it
        for r, executor in enumerate(self.replicas):
            for stage in executor.stages:
                stage.reduce_gradients = self._reducer(r, stage.index)

    @property
    def stages(self) -> list[StageRuntime]:
        """Replica 0's stages (the copy the weights are read from)."""
        return self.replicas[0].stages

    def may_step(self, replica: int, stage: int) -> bool:
        """Whether ``replica`` may take its next step at ``stage``: all replicas have their
        gradients (their queues reach the step), or the round of steps has begun."""
        if self._stepped[stage]:
            return replica not in self._stepped[stage]
        return all(q.queues[stage] and q.queues[stage][0].op == STEP for q in self.replicas)

    def reduce_round(self, stage: int) -> None:
        """Sum ``stage``'s gradients over the replicas, once per round of steps (every replica
        has its gradients: :meth:`may_step`)."""
        if not self._reduced[stage]:
            sum_in_memory([executor.stages[stage].trainable() for executor in self.replicas])
            self._reduced[stage] = True

    def _reducer(self, replica: int, stage: int) -> Callable[[Sequence[torch.Tensor]], None]:
        def reduce(_params: Sequence[torch.Tensor]) -> None:
            self.reduce_round(stage)
            self._stepped[stage].add(replica)
            if len(self._stepped[stage]) == len(self.replicas):
                self._stepped[stage] = set()
                self._reduced[stage] = False

        return reduce

    def round_open(self) -> bool:
        """Whether a round of steps taken together may begin or has begun (:meth:`round_total`):
        every stage of every replica is about to step (its gradients are complete)."""
        if self._round is not None:
            return True
        return all(q and q[0].op == STEP for executor in self.replicas for q in executor.queues)

    def round_total(self) -> float:
        """Σ‖g_k‖² over the stages of the replica-summed gradients of the steps being taken
        together (clipping, loss scaling): the first replica to ask sums every stage's gradients
        over the replicas not summed yet, and every replica gets the same number."""
        if self._round is None:
            for k in range(self.num_stages):
                self.reduce_round(k)
            for executor in self.replicas:
                executor.finish_shared_grads()
            self._round = (sum(norm_share(stage) for stage in self.replicas[0].stages), 0)
        total, taken = self._round
        self._round = (total, taken + 1) if taken + 1 < len(self.replicas) else None
        return total

    def _run(self) -> None:
        progress = True
        while progress:
            before = sum(len(q) for executor in self.replicas for q in executor.queues)
            for executor in self.replicas:
                executor._run()
            progress = sum(len(q) for executor in self.replicas for q in executor.queues) < before

    def submit(self, batch: MiniBatch) -> None:
        for r, executor in enumerate(self.replicas):
            executor.submit(replica_part(batch, r, len(self.replicas)))
        self._run()

    def flush(self) -> None:
        for executor in self.replicas:
            executor._extend([s.on_flush() for s in executor.schedules])
        self._run()
        stalled = [
            f"replica {r} stage {k}: {q[0]}"
            for r, executor in enumerate(self.replicas)
            for k, q in enumerate(executor.queues)
            if q
        ]
        if stalled:
            raise PipelineStalledError(
                f"pipeline stalled ({', '.join(stalled)}): the schedule is inconsistent; report it with "
                "the method, the number of stages, of replicas and of micro-batches"
            )
        for executor in self.replicas:  # the shared parameters' pending rounds (replica-summed)
            for stage, channel in zip(executor.stages, executor.channels):
                if stage.shared is not None and stage.optimizer is not None:
                    stage.shared.drain(channel, stage.optimizer)

    def wait_loss(self, micro_batch: int) -> None:
        """Nothing to wait for: the losses are computed inside :meth:`submit` and :meth:`flush`."""

    def forward_only(
        self, chunks: Sequence[tuple[Any, ...]], sizes: Sequence[Rows] = ()
    ) -> list[tuple[Any, ...]]:
        """Replica 0 evaluates (the replicas hold the same weights)."""
        return self.replicas[0].forward_only(chunks, sizes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.replicas[0].state_dict()

    def replica_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every replica's parameters and buffers (the tests compare them)."""
        return [executor.state_dict() for executor in self.replicas]

    def load_state_dict(self, state: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> None:
        for executor in self.replicas:
            executor.load_state_dict(state, aliases)

    def optimizer_state(self) -> dict[str, Any]:
        return merge_optimizer_states([self.replicas[0].optimizer_state()])

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        for r, executor in enumerate(self.replicas):  # a copy each: stages keep the tensors given
            executor.load_optimizer_state(state if r == 0 else copy.deepcopy(state))

    def resident_bytes(self) -> list[int]:
        return [b for executor in self.replicas for b in executor.resident_bytes()]

    def peak_weight_versions(self) -> list[int]:
        return self.replicas[0].peak_weight_versions()

    def prediction_errors(self) -> list[PredictionError]:
        return self.replicas[0].prediction_errors()

    def stage_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return self.replicas[0].stage_state_dicts()

    def sent_bytes(self) -> list[int]:
        """Replica 0's bytes sent per stage (the other replicas send as many)."""
        return self.replicas[0].sent_bytes()

    def resume(self, mini_batches: int) -> None:
        for executor in self.replicas:
            executor.resume(mini_batches)

    def close(self) -> None:
        """Drop what is in flight; the stages live in this process."""
        for replica in self.replicas:
            replica.close()

    abort = close  # stops nothing more: a batch this process refuses reaches no stage


def replica_copy(spec: PipelineSpec, replica: int) -> PipelineSpec:
    """``spec`` as ``replica`` builds its stages: with its own dropout seed."""
    return spec if replica == 0 else replace(spec, seed=replica_seed(spec.seed, replica))


def join_replica_groups(spec: PipelineSpec, stage: int, timeout: float) -> GroupAllReduce:
    """Create every stage's replica process group (``dist.new_group`` is collective: every
    rank creates all of them, in stage order) and return the all-reduce of ``stage``'s."""
    groups = [
        dist.new_group(
            replica_ranks(k, spec.num_stages, spec.data_parallel), timeout=datetime.timedelta(seconds=timeout)
        )
        for k in range(spec.num_stages)
    ]
    return GroupAllReduce(groups[stage], timeout, stage)


def local_executor(
    spec: PipelineSpec, traced: TracedModel, device: torch.device, on_loss: LossCallback
) -> ReplicatedLocalExecutor:
    """The local executor of ``spec``'s N × R layout: every replica's stages, built alike
    (each replica from its own copy of the model, as a worker process builds it from the
    unpickled spec: a trace shares the model's parameter tensors; each with its own dropout
    seed, :func:`replica_seed`)."""
    stages = []
    for r in range(spec.data_parallel):
        own = replica_copy(spec, r)
        if r > 0:
            own = replace(own, model=copy.deepcopy(spec.model))
        graph = traced if r == 0 else own.trace()
        stages.append([build_stage(own, graph, k, device) for k in range(spec.num_stages)])
    return ReplicatedLocalExecutor(stages, spec.schedule, on_loss)
