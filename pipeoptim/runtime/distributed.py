"""Distributed executors: one process per stage, talking through torch.distributed.

:class:`ProcessExecutor` is used when ``compile`` is called from a plain Python process: it
spawns one worker per stage (:func:`pipeoptim.runtime.worker.worker_main`), feeds them
mini-batches over queues, and collects losses on a background thread. A worker that fails
reports why; a worker that dies silently is noticed through its process sentinel. Either way
every other worker is stopped and the error names the failed stage.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import cloudpickle
import torch

from pipeoptim import numerics
from pipeoptim.errors import PeerLostError, PipelineError, PipeoptimError
from pipeoptim.runtime import wire
from pipeoptim.runtime.affinity import binding_asked, driver_cores
from pipeoptim.runtime.build import PipelineSpec
from pipeoptim.runtime.executor import MiniBatch
from pipeoptim.runtime.one_driver import OneDriver
from pipeoptim.runtime.procmem import resident_bytes
from pipeoptim.runtime.replicas import replica_part, stage_and_replica
from pipeoptim.runtime.spawning import (
    MAIN_GUARD,
    check_devices,
    free_port,
    main_module_not_rerun,
    pickle_spec,
    signals_deferred,
    worker_context,
)
from pipeoptim.runtime.staleness import PredictionError
from pipeoptim.runtime.worker import worker_main

#: torch threads of each stage process on the CPU: the ranks share the cores, one thread each
#: (profiles are timed so too: :func:`pipeoptim.runtime.linkcost.stage_threads`)
STAGE_THREADS = 1


class ProcessExecutor(OneDriver):
    """Spawns and drives one worker process per stage.

    Args:
        spec: what the workers build their stages from.
        on_loss: ``on_loss(micro_batch, loss)``, called from a background thread.
        on_error: ``on_error(exception)`` when a stage fails.
        timeout: seconds a stage may wait for a neighbour, and the driver for a reply.
        threads: torch threads per worker (1: ranks share the cores).
    """

    def __init__(
        self,
        spec: PipelineSpec,
        on_loss: Callable[[int, torch.Tensor], None],
        on_error: Callable[[BaseException], None],
        timeout: float = 300.0,
        threads: int = STAGE_THREADS,
    ) -> None:
        check_devices(spec.world_size)
        self.world = spec.world_size  # N stages × R replicas (pipeoptim.runtime.replicas)
        self.num_stages = spec.num_stages
        self.replicas = spec.data_parallel
        self.timeout = timeout
        self.on_loss = on_loss
        self.on_error = on_error
        self.error: PipeoptimError | None = None
        self._requests = itertools.count()
        self._replies: dict[int, dict[int, Any]] = {}
        self._last_loss = [-1] * spec.data_parallel  # newest micro-batch with a loss, per replica
        self._cond = threading.Condition()
        self._stopping = False  # workers are expected to exit
        self._closing = False  # the monitor thread ends
        binding_asked()  # a typo in PIPEOPTIM_CPU_AFFINITY is refused here, not in every worker
        payload = pickle_spec(spec)
        self._numerics = numerics.current()  # the workers' torch settings: this process's
        ctx = worker_context()
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(self.world)]
        for commands in self.commands:
            commands.cancel_join_thread()  # a dead worker's unread commands must not block exit
            commands.put(("spec", None, (payload, dict(os.environ), driver_cores(), self._numerics)))
        init = f"tcp://127.0.0.1:{free_port()}"
        self.processes = [
            ctx.Process(
                target=worker_main,
                args=(rank, self.world, init, self.commands[rank], self.results, timeout, threads),
                name=f"pipeoptim-stage-{rank}",
                daemon=True,
            )
            for rank in range(self.world)
        ]
        self._ready: set[int] = set()
        try:
            with main_module_not_rerun(), signals_deferred():
                for p in self.processes:
                    p.start()
            watch = {"target": _watch, "args": (weakref.ref(self), self.results), "name": "pipeoptim-monitor"}
            self._monitor = threading.Thread(**watch, daemon=True)  # type: ignore[arg-type]
            self._monitor.start()
            self._wait_for(lambda: len(self._ready) == self.world, "the workers to start")
        except BaseException:  # Ctrl-C or a failure while the workers start: none is left behind
            self._stopping = True
            self._stop_workers(grace=2.0)
            raise

    # -- background monitoring ----------------------------------------------------------

    def _handle(self, kind: str, rank: int, key: Any, payload: Any) -> None:
        if kind == "losses":  # [(micro-batch, loss)] of one command, in order
            for micro_batch, value in payload:
                self.on_loss(micro_batch, value, rank // self.num_stages)
            if payload:
                with self._cond:
                    self._last_loss[rank // self.num_stages] = payload[-1][0]  # in order: the newest
                    self._cond.notify_all()
        elif kind == "ready":
            with self._cond:
                self._ready.add(rank)
                self._cond.notify_all()
        elif kind == "done":
            with self._cond:
                self._replies.setdefault(key, {})[rank] = payload
                self._cond.notify_all()
        elif kind == "error":
            text, exc = payload
            error = exc if exc is not None else PipelineError(text.strip())
            if isinstance(error, PeerLostError):
                error = self._root_cause(error, rank)
            self._fail(error)

    def _root_cause(self, error: PeerLostError, reporter: int) -> PipeoptimError:
        """A stage that lost its neighbour is a symptom: wait briefly for the cause, either
        another stage's own error or a stage that died (killed by a signal, or exited with a
        code, 0 included, without reporting an error: ``os._exit(3)`` in a stage was reported
        as its neighbour's lost connection, and ``os._exit(0)`` still was: helper-130)."""
        symptoms = {reporter}
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                kind, rank, _key, payload = self.results.get(timeout=0.1)
            except Exception:
                kind = None
            if kind == "error":
                text, exc = payload
                other = exc if exc is not None else PipelineError(text.strip())
                if not isinstance(other, PeerLostError):
                    return other
                symptoms.add(rank)
            for rank, p in enumerate(self.processes):
                if p.exitcode is not None and (p.exitcode < 0 or rank not in symptoms):  # 0 too
                    return _died(rank, p)
        return error

    def _check_processes(self) -> None:
        if self._stopping or self.error is not None:
            return
        for rank, p in enumerate(self.processes):
            if p.exitcode is None:
                continue
            # a dying worker sends its error first: read what is left before blaming the exit
            deadline = time.monotonic() + 2.0
            while self.error is None and time.monotonic() < deadline:
                try:
                    self._handle(*self.results.get(timeout=0.1))
                except Exception:
                    break
            if self.error is None:
                self._fail(_died(rank, p))
            return

    def _fail(self, error: PipeoptimError) -> None:
        with self._cond:
            if self.error is not None:
                return
            self.error = error
            self._cond.notify_all()
        self._stop_workers()
        self.on_error(error)

    def _wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while not condition():
                if self.error is not None:
                    raise self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    error = PipelineError(f"timed out after {self.timeout:.0f} s waiting for {what}")
                    self._cond.release()
                    try:
                        self._fail(error)
                    finally:
                        self._cond.acquire()
                    raise error
                self._cond.wait(min(left, 0.5))

    # -- requests -------------------------------------------------------------------

    def _send(self, rank: int, kind: str, request: int | None, payload: Any) -> None:
        if self.error is not None:
            raise self.error
        self.commands[rank].put((kind, request, payload))

    def _carry_numerics(self) -> None:
        """Hand the workers this process's torch settings (:mod:`pipeoptim.numerics`) if changed."""
        now = numerics.current()
        if now != self._numerics:
            self._numerics = now
            for rank in range(self.world):
                self._send(rank, "numerics", None, now)

    def _request(self, kind: str, payloads: dict[int, Any] | None = None) -> dict[int, Any]:
        self._carry_numerics()
        request = next(self._requests)
        for rank in range(self.world):
            self._send(rank, kind, request, (payloads or {}).get(rank))
        self._wait_for(
            lambda: len(self._replies.get(request, {})) == self.world, f"'{kind}' from every stage"
        )
        with self._cond:
            return self._replies.pop(request)

    def submit(self, batch: MiniBatch) -> None:
        self._carry_numerics()
        last = self.num_stages - 1
        for rank in range(self.world):
            stage, replica = stage_and_replica(rank, self.num_stages)
            share = replica_part(batch, replica, self.replicas)
            inputs, targets = share.inputs if stage == 0 else [], share.targets if stage == last else []
            part = replace(share, inputs=inputs, targets=targets)
            self._send(rank, "batch", None, wire.dumps(part))  # as bytes: see pipeoptim.runtime.wire

    def _per_stage(self, kind: str) -> list[Any]:
        """Replica 0's workers' replies to a ``kind`` request, in stage order (the other
        replicas are alike)."""
        replies = self._request(kind)
        return [replies[r] for r in range(self.num_stages)]

    def flush(self) -> None:
        self._request("flush")

    def abort(self) -> None:
        """Nothing to stop at once: a batch this process refuses reaches no stage."""

    def wait_loss(self, micro_batch: int) -> None:
        """Wait until every replica's last stage has reported ``micro_batch``'s loss (the
        watcher thread delivers it), at most the timeout: a stage stuck in its forward was
        waited on forever where no neighbour times out (a single stage)."""
        with contextlib.suppress(PipeoptimError):  # the pipeline failed every pending loss (on_error)
            self._wait_for(
                lambda: self.error is not None or min(self._last_loss) >= micro_batch,
                f"the loss of micro-batch {micro_batch} (a stage made no progress: stuck in its compute?)",
            )

    def forward_only(self, chunks: list[tuple[Any, ...]], sizes: list[int]) -> list[Any]:
        replies = self._request("eval", {r: (chunks if r == 0 else None, sizes) for r in range(self.world)})
        return cloudpickle.loads(replies[self.num_stages - 1])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.replica_state_dicts()[0]

    def replica_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every replica's parameters and buffers (replica 0's is :meth:`state_dict`)."""
        replies = self._request("state")
        merged: list[dict[str, torch.Tensor]] = [{} for _ in range(self.replicas)]
        for rank in sorted(replies):
            merged[rank // self.num_stages].update(replies[rank])
        return merged

    def stage_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return self._per_stage("state")

    def load_state_dict(self, state: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> None:
        self._request("load_state", dict.fromkeys(range(self.world), state))

    def optimizer_state(self) -> dict[str, Any]:
        from pipeoptim.runtime.stage_state import merge_optimizer_states

        replies = self._request("optimizer_state")
        return merge_optimizer_states([replies[r] for r in range(self.num_stages)])  # replica 0

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self._request("load_optimizer_state", dict.fromkeys(range(self.world), state))

    def timeline(self) -> list[list[tuple[str, int, float, float]]]:
        """Per stage, the last actions run: ``(op, micro-batch, start, end)`` (perf_counter s;
        ``start`` once the action's received inputs had arrived)."""
        return self._per_stage("timeline")

    def resume(self, mini_batches: int) -> None:
        self._request("resume", dict.fromkeys(range(self.world), mini_batches))

    def resident_bytes(self) -> list[int]:
        """Resident memory of each worker process now, in bytes (stage order)."""
        return [resident_bytes(p.pid) for p in self.processes]

    def peak_weight_versions(self) -> list[int]:
        return self._per_stage("versions")

    def prediction_errors(self) -> list[PredictionError]:
        return self._per_stage("prediction_error")

    def sent_bytes(self) -> list[int]:
        """Per stage, the tensor bytes it has sent to its neighbours (activations, gradients)."""
        return self._per_stage("sent_bytes")

    def cpu_seconds(self) -> list[float]:
        """Per stage, the CPU seconds its worker process has used so far, all its threads
        (``time.process_time`` there: the stage's own thread and the transport's)."""
        return self._per_stage("cpu_seconds")

    # -- shutdown ---------------------------------------------------------------------

    def _stop_workers(self, grace: float = 5.0) -> None:
        started = [p for p in self.processes if p.pid is not None]  # a failed start leaves some
        for p in started:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + grace
        for p in started:
            p.join(max(deadline - time.monotonic(), 0.0))
            if p.is_alive():
                p.kill()
                p.join(1.0)

    def close(self) -> None:
        """Ask every worker to finish, then make sure none is left."""
        if self._stopping:
            return
        self._stopping = True
        if self.error is None:
            for rank in range(self.world):
                if self.processes[rank].is_alive():
                    self.commands[rank].put(("close", None, None))
            deadline = time.monotonic() + 10.0
            for p in self.processes:  # the monitor keeps draining results meanwhile
                p.join(max(deadline - time.monotonic(), 0.0))
        self._stop_workers(grace=2.0)
        self._closing = True
        if self._monitor is not threading.current_thread():  # closed by the collector there
            self._monitor.join(2.0)
        # the queues' pipes and feeder threads now (a closed pipeline kept 2 pipes and a thread);
        # what a dead worker left unread is read, or its feeder would wait on the full pipe for ever
        for q in self.commands:
            with contextlib.suppress(queue.Empty, OSError, EOFError, ValueError):
                while True:
                    q.get(timeout=0.05)
        for q in [*self.commands, *([] if self._monitor.is_alive() else [self.results])]:
            q.cancel_join_thread()
            q.close()


def _watch(ref: weakref.ref[ProcessExecutor], results: Any) -> None:
    """The monitor thread: losses, replies and errors from the workers while the executor
    lives. It holds the executor only while it handles a message, so that a pipeline dropped
    without ``close()`` is collected and closed (the thread held it, and its workers ran
    until exit: helper-130)."""
    while True:
        try:
            message = results.get(timeout=0.2)
        except Exception:  # queue.Empty, or the queue closed at shutdown
            message = None
        executor = ref()
        if executor is None or executor._closing:
            return
        if message is not None:
            executor._handle(*message)
        executor._check_processes()
        del executor


def _died(rank: int, process: Any) -> PipelineError:
    """The error naming stage ``rank``'s ended ``process``: killed by a signal, or exited with
    a code without reporting an error."""
    if process.exitcode < 0:
        return PipelineError(f"stage {rank} (pid {process.pid}) was killed by signal {-process.exitcode}")
    return PipelineError(
        f"stage {rank} (pid {process.pid}) died with exit code {process.exitcode} (no error reported; "
        f"see its output above. {MAIN_GUARD})"
    )
