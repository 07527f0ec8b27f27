"""A stage process: one rank of the pipeline, running its stage's action list.

:class:`StageProcess` is used both by the worker processes the driver spawns
(:func:`worker_main`, commands arrive on a queue) and, under ``torchrun``, directly by each
rank's own ``Pipeline``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import cloudpickle
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from pipeoptim import numerics
from pipeoptim.errors import PipelineError, PipeoptimError
from pipeoptim.runtime.affinity import pin_rank, take_cores
from pipeoptim.runtime.async_norms import note_size
from pipeoptim.runtime.build import PipelineSpec, aliases_of, build_stage, input_grad_mask
from pipeoptim.runtime.comm import DistChannel
from pipeoptim.runtime.delivery import forward_chain
from pipeoptim.runtime.driver_watch import follow_driver
from pipeoptim.runtime.executor import MicroBatch, MiniBatch, StageState, run_action
from pipeoptim.runtime.grad_modes import training_modes
from pipeoptim.runtime.peer_loss import lost_peer
from pipeoptim.runtime.replicas import join_replica_groups, replica_copy, stage_and_replica
from pipeoptim.runtime.schedule import BACKWARD, FORWARD, Action, deferred_tail, last_before_step
from pipeoptim.runtime.shared_build import shared_holders
from pipeoptim.runtime.spawning import leave_agent_store, unpickle_spec
from pipeoptim.runtime.stage import StageRuntime
from pipeoptim.runtime.stage_state import load_optimizer_state, load_stage_state, optimizer_state, stage_state


class StageProcess:
    """Runs the stage of global ``rank`` of ``spec`` in this process (stage ``rank % N`` of
    replica ``rank // N``, :mod:`pipeoptim.runtime.replicas`); torch.distributed must be
    initialised. :attr:`rank` is the stage index, :attr:`replica` the replica's. ``group``:
    the process group of the pipeline's messages between stages (``None``: the default
    group; :class:`pipeoptim.runtime.comm.DistChannel`)."""

    def __init__(
        self, spec: PipelineSpec, rank: int, device: torch.device, timeout: float, group: Any = None
    ) -> None:
        self.spec = spec
        self.world = spec.num_stages
        self.rank, self.replica = stage_and_replica(rank, self.world)
        rank = self.rank
        self.traced = spec.trace()
        self.aliases = aliases_of(self.traced.tied)
        self.stage: StageRuntime = build_stage(replica_copy(spec, self.replica), self.traced, rank, device)
        self.reducer = join_replica_groups(spec, rank, timeout) if spec.data_parallel > 1 else None
        if self.reducer is not None:
            self.reducer.attach(self.stage.trainable())
            self.stage.reduce_gradients = self.reducer
        self.schedule = spec.schedule(rank)
        self.state = StageState()
        out_mask = input_grad_mask(spec.plan, rank + 1) if rank < self.world - 1 else []
        self.channel = DistChannel(
            rank,
            self.world,
            spec.plan,
            self.stage.input_grad_mask,
            out_mask,
            timeout,
            device,
            first_rank=self.replica * self.world,
            group=group,
        )
        if self.stage.async_norms is not None:
            self.channel.note_size = note_size(self.world)
        holders = shared_holders(spec.plan)
        for replica in range(spec.data_parallel if len(holders) > 1 else 0):
            # the holders of each replica sum their parts (already summed over the replicas);
            # every rank creates every group, in the same order
            ranks = [replica * self.world + k for k in holders]
            group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout))
            if replica == self.replica and rank in holders:
                self.channel.shared_group, self.channel.shared_size = group, len(holders)
        self.device = device
        #: the last actions run: ``(op, micro-batch, start, end)`` in perf_counter seconds,
        #: ``start`` once the action's received inputs had arrived (its wait is not work)
        self.timeline: deque[tuple[str, int, float, float]] = deque(maxlen=4096)
        #: set where this stage runs in the thread that calls ``step()`` (torchrun) on a core of
        #: its own: its last backward and step of a mini-batch may wait for the next call
        self.may_defer = False
        self._deferred: list[Action] = []

    @property
    def defers_tail(self) -> bool:
        """Whether :meth:`submit` leaves the tail of a mini-batch to the next call: where
        :attr:`may_defer`, at stage 0 (no stage waits on its backward) and where its step waits
        for no other rank (no replicas' all-reduce, global norm or shared weights' gradients)."""
        stage = self.stage
        alone = self.reducer is None and not stage.steps_together and stage.async_norms is None
        return self.may_defer and self.rank == 0 and self.world > 1 and alone and stage.shared is None

    def submit(
        self, batch: MiniBatch, side_work: Callable[[], None] | None = None
    ) -> list[tuple[int, float]]:
        """Run this stage's actions for a new mini-batch; returns losses computed (last stage).
        ``side_work`` (the executor's bookkeeping of the mini-batch) runs where the stage waits
        anyway: before its first backward that needs another stage's gradients (the round trip
        through the later stages), else after the last action.
        Where :attr:`defers_tail`, the last backward and the step are left to the next call
        (:func:`~pipeoptim.runtime.schedule.deferred_tail`), which runs them once its mini-batch
        is set up: the user's code between the calls and the checks of the batch run in the
        wait for that backward's gradients (0.5-0.9 ms a mini-batch on the critical path of the
        MLP of ``benchmarks/throughput.py`` at 2 stages; where ranks share a core it took the
        core from the stage on the critical path, 5% slower at 4 ranks on 2 cores)."""
        first, rows = batch.index * self.spec.micro_batches, batch.split()
        for j, size in enumerate(batch.sizes):
            inputs = batch.inputs[j] if batch.inputs else None
            targets = batch.targets[j] if batch.targets else None
            if inputs is not None:
                inputs = tuple(x.to(self.device) for x in inputs)
            self.channel.expect(first + j, size)
            self.state.given[first + j] = MicroBatch(
                first + j,
                batch.index,
                batch.scales[j],
                inputs,
                _to(targets, self.device),
                (batch.index, batch.offset + j, rows),
            )
            self.stage.set_hyperparameters(first + j, batch.hyper)
        actions = self._deferred + self.schedule.on_mini_batch(len(batch.sizes))
        stop = deferred_tail(actions) if self.defers_tail else len(actions)
        self._deferred = actions[stop:]
        self._run(actions, side_work, stop)
        losses, self.channel.losses = self.channel.losses, []
        return losses

    def flush(self) -> list[tuple[int, float]]:
        """Run what :meth:`submit` left and the cool-down, and wait for every send (every call
        that reads or changes the weights flushes first)."""
        actions, self._deferred = self._deferred + self.schedule.on_flush(), []
        self._run(actions)
        if self.stage.shared is not None and self.stage.optimizer is not None:
            self.stage.shared.drain(self.channel, self.stage.optimizer)
        self.channel.wait_sends()
        losses, self.channel.losses = self.channel.losses, []
        return losses

    @training_modes()
    def _run(
        self, actions: list[Action], work: Callable[[], None] | None = None, stop: int | None = None
    ) -> None:
        """Run ``actions[:stop]``, receives posted one action ahead (into the rest too); ``work``
        before the first backward that needs another stage's gradients, else at the end; in
        :func:`~pipeoptim.runtime.grad_modes.training_modes`, whatever the caller's."""
        for i, action in enumerate(actions[:stop]):
            for nxt in actions[i : i + 2]:  # post receives one action ahead
                if nxt.op == FORWARD:
                    self.channel.prefetch("act", nxt.micro_batch)
                elif nxt.op == BACKWARD:
                    self.channel.prefetch("grad", nxt.micro_batch)
            if work is not None and action.op == BACKWARD and self.rank < self.world - 1:
                work()
                work = None
            if self.reducer is not None and last_before_step(actions, i):
                self.reducer.arm()  # its all-reduce starts during this backward
            start = time.perf_counter()
            run_action(self.stage, action, self.channel, self.state)
            self.channel.end_action()
            # the action's work starts once its inputs have arrived (the wait is idle time)
            start = max(start, self.channel.arrived_at)
            self.timeline.append((action.op, action.micro_batch, start, time.perf_counter()))
            if action.op == BACKWARD:
                self.channel.done(action.micro_batch)
        if work is not None:
            work()

    def forward_only(self, chunks: list[Any] | None, sizes: list[int]) -> list[Any] | None:
        """Evaluation-mode forward of chunks (stage 0 gets the data); last stage returns outputs.
        Replica 0 alone evaluates (the replicas hold the same weights)."""
        if self.replica > 0:
            return None
        outputs = []
        for c, size in enumerate(sizes):
            mb = -1 - c  # evaluation micro-batches never meet training ones
            self.channel.sizes[mb] = size
            if self.rank == 0:
                assert chunks is not None
                values = tuple(x.to(self.device) for x in chunks[c])
            else:
                values = self.channel.inputs(mb)
            out = forward_chain([self.stage.module], values)
            if self.rank < self.world - 1:
                self.channel.send_activations(mb, out)
            else:
                outputs.append(_to(out, torch.device("cpu")))
            self.channel.done(mb)
            self.channel.end_action()
        self.channel.wait_sends()
        return outputs if self.rank == self.world - 1 else None

    def destroy_groups(self) -> None:
        """Destroy the process groups this stage is in that the pipeline created besides its
        own (its replicas', its shared weights' holders') and drop this stage's references to
        them (a group's connections and threads end once none is left)."""
        groups = []
        if self.reducer is not None:
            self.reducer.detach()
            groups.append(self.reducer.group)
            self.stage.reduce_gradients = self.reducer = None
        if self.channel.shared_group is not None:
            groups.append(self.channel.shared_group)
            self.channel.shared_group = None
        for group in groups:
            dist.destroy_process_group(group)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in stage_state([self.stage]).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_stage_state(self.stage, state, self.aliases)

    def optimizer_state(self) -> dict[str, Any]:
        return optimizer_state(self.stage)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.stage, state)

    def resume(self, mini_batches: int) -> None:
        self.schedule.resume(mini_batches, self.stage.steps)

    def memory_report(self) -> dict[str, int]:
        return self.stage.memory_report()

    def peak_versions(self) -> int:
        return self.stage.policy.peak_versions if self.stage.policy is not None else 1


def _to(value: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def stage_device(rank: int) -> torch.device:
    """cuda:rank when CUDA has a device for every stage, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def worker_main(
    rank: int,
    world: int,
    init_method: str,
    commands: Any,
    results: Any,
    timeout: float,
    threads: int,
) -> None:
    """Entry point of a worker process: serve commands until ``close`` (or a failure).

    The first command is ``("spec", None, (bytes of the pipeline spec, the driver's
    environment, the driver's cores, its torch settings))``; ``("numerics", None, settings)``
    later when the driver's changed (:mod:`pipeoptim.numerics`). The environment, cores
    and settings replace the worker's own: a
    worker forked from the fork server (:func:`pipeoptim.runtime.spawning.worker_context`)
    would otherwise see the server's, as they were at the driver's first pipeline (a
    ``GLOO_SOCKET_IFNAME`` set later would be missed, or a ``taskset`` of the driver). It comes on the queue,
    not as a process argument, because ``multiprocessing`` writes a spawned child's arguments
    from the starting thread and blocks while the child has not read them -- forever when the
    child died first (e.g. re-running a script that lacks a main guard) and the spec is
    larger than a pipe's buffer.

    Every reply goes on ``results`` as ``(kind, rank, request id, payload)``; a failure is
    reported as ``("error", rank, None, (text, pipeoptim error or None))`` and ends the
    process with exit code 1. SIGINT is ignored and SIGTERM obeyed only from the driver
    (:func:`pipeoptim.runtime.driver_watch.stop_on_driver_sigterm`): on Ctrl-C, or a SIGTERM to the
    whole process group, the driver stops the workers.
    """
    name = f"stage {rank}"  # with replicas, once the spec says: stage k of replica r (rank)
    driver = follow_driver(name)  # even while blocked in a receive or a queue write
    torch.set_num_threads(threads)
    try:
        kind, _request, payload = commands.get(timeout=timeout)
        if kind != "spec":
            raise PipelineError(f"stage {rank} expected the pipeline spec first, got {kind!r}")
        pickled, environ, cores, settings = payload
        os.environ.clear()
        os.environ.update(environ)
        leave_agent_store()  # a driver under torchrun: this pipeline's group is its own
        take_cores(cores)
        device = stage_device(rank)
        spec = unpickle_spec(pickled)
        numerics.apply(settings)  # after the user's modules were imported: they may set them too
        if spec.data_parallel > 1:
            stage, replica = stage_and_replica(rank, spec.num_stages)
            name = f"stage {stage} of replica {replica} (rank {rank})"
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # before gloo starts its threads, which inherit the cores
            pin_rank(rank, world)
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        process = StageProcess(spec, rank, device, timeout)
        results.put(("ready", rank, None, str(device)))
        while True:
            try:
                kind, request, payload = commands.get(timeout=1.0)
            except queue.Empty:
                if driver is not None and not driver.is_alive():  # the driver died: do not linger
                    return
                continue
            if kind == "close":
                break
            reply = _serve(process, kind, payload)
            if kind in ("batch", "flush", "numerics"):  # no reply, but losses and a flush's end
                if reply:  # one message for the command's losses, not one per micro-batch
                    results.put(("losses", rank, None, reply))
                if kind == "flush":
                    results.put(("done", rank, request, None))
            else:
                results.put(("done", rank, request, reply))
        results.put(("closed", rank, None, None))
    except BaseException as exc:  # report whatever killed this stage, then exit
        notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", []))  # where it was raised
        text = f"{name} failed: {type(exc).__name__}: {exc}{notes}\n{traceback.format_exc()}"
        error = lost_peer(exc, rank) or (exc if isinstance(exc, PipeoptimError) else None)
        try:
            results.put(("error", rank, None, (text, error)))
            results.close()
            results.join_thread()  # the message must leave before the process does
        finally:
            os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _set_measure_memory(process: StageProcess, on: Any) -> None:
    process.stage.measure_memory = bool(on)


#: What a worker does with each kind of command from the driver (``payload`` -> reply).
COMMANDS: dict[str, Callable[[StageProcess, Any], Any]] = {
    "batch": lambda process, payload: process.submit(pickle.loads(payload)),
    "numerics": lambda _process, settings: numerics.apply(settings),  # the driver's changed
    "flush": lambda process, _: process.flush(),
    # the outputs may be of the user's classes defined in __main__ (a dataclass), which plain
    # pickle refuses from a worker that got them by value: cloudpickle brings them back as
    # the driver's own classes
    "eval": lambda process, payload: cloudpickle.dumps(process.forward_only(*payload)),
    "state": lambda process, _: process.state_dict(),
    "load_state": StageProcess.load_state_dict,
    "optimizer_state": lambda process, _: process.optimizer_state(),
    "load_optimizer_state": StageProcess.load_optimizer_state,
    "versions": lambda process, _: process.peak_versions(),
    "prediction_error": lambda process, _: process.stage.prediction_error.result(),
    "timeline": lambda process, _: list(process.timeline),
    "measure_memory": _set_measure_memory,
    "memory": lambda process, _: process.memory_report(),
    "sent_bytes": lambda process, _: process.channel.sent_bytes,
    "cpu_seconds": lambda process, _: time.process_time(),
    "resume": StageProcess.resume,
}


def _serve(process: StageProcess, kind: str, payload: Any) -> Any:
    """Carry out one command of kind ``kind`` (:data:`COMMANDS`); returns its reply.

    Raises:
        ValueError: an unknown kind.
    """
    command = COMMANDS.get(kind)
    if command is None:
        raise ValueError(f"unknown command {kind!r}")
    return command(process, payload)
