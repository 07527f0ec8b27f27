"""Executor selection: start the stages of a pipeline where ``executor=`` says.

``"local"``: every stage in this process (:class:`~pipeoptim.runtime.executor.LocalExecutor`);
``"processes"``: one worker process per stage
(:class:`~pipeoptim.runtime.distributed.ProcessExecutor`); ``"torchrun"``: this process is one
rank of a torchrun job (:class:`~pipeoptim.runtime.spmd.SPMDExecutor`).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from pipeoptim.compiler.trace import TracedModel
from pipeoptim.microbatch import Rows
from pipeoptim.runtime.build import PipelineSpec, build_stage
from pipeoptim.runtime.executor import LocalExecutor, MiniBatch
from pipeoptim.runtime.linkcost import stage_threads
from pipeoptim.runtime.staleness import PredictionError

EXECUTORS = ("local", "processes", "torchrun")


class Executor(Protocol):
    """What a :class:`~pipeoptim.pipeline.Pipeline` asks of the executor running its stages.

    Implemented by :class:`~pipeoptim.runtime.executor.LocalExecutor`,
    :class:`~pipeoptim.runtime.replicas.ReplicatedLocalExecutor`,
    :class:`~pipeoptim.runtime.distributed.ProcessExecutor` and
    :class:`~pipeoptim.runtime.spmd.SPMDExecutor`.
    """

    def same_call(self, call: str, failure: BaseException | None = None) -> None:
        """Under torchrun, check that every rank makes the public ``call`` now
        (:meth:`pipeoptim.runtime.rank_calls.RankCalls.same_call`); ``failure`` (this rank's
        refusal of it) is raised, there after every rank has said whether it has one."""
        ...

    def share_batch_size(
        self, batch: Rows | None, refused: bool = False, call: str = "step", settings: object = None
    ) -> Rows | None:
        """The rows of the next batch as every stage sees them (under torchrun rank 0's;
        ``refused``: rank 0 refused its inputs, and every rank refuses the batch; ``call``:
        ``"step"`` or ``"predict"``, whose batch it is; ``settings``: what every rank's
        optimizer steps this batch with, under torchrun checked to be rank 0's)."""
        ...

    def abort(self) -> None:
        """Stop at once after a failure or refusal only this process saw (torchrun: the last
        rank's targets, its loss_fn's error, a NaN), so that the other processes do not wait
        for it until the timeout."""
        ...

    def submit(self, batch: MiniBatch) -> None:
        """Feed one mini-batch; its micro-batch losses reach the ``on_loss`` callback."""
        ...

    def wait_loss(self, micro_batch: int) -> None:
        """Drive whatever must run for the loss of ``micro_batch`` to arrive."""
        ...

    def poll_losses(self) -> None:
        """Take in the losses that have arrived, without blocking (``Loss.done()``)."""
        ...

    def flush(self) -> None:
        """Finish every mini-batch in flight (backward and step)."""
        ...

    def forward_only(self, chunks: Sequence[tuple[Any, ...]] | None, sizes: Sequence[Rows]) -> list[Any]:
        """Evaluation-mode forward of each chunk of inputs (``sizes``: its rows); flat outputs."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> None: ...
    def optimizer_state(self) -> dict[str, Any]: ...
    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...
    def resume(self, mini_batches: int) -> None: ...
    def resident_bytes(self) -> list[int]: ...
    def peak_weight_versions(self) -> list[int]: ...
    def prediction_errors(self) -> list[PredictionError]: ...
    def stage_state_dicts(self) -> list[dict[str, torch.Tensor]]: ...
    def sent_bytes(self) -> list[int]: ...
    def close(self) -> None: ...


def check_executor(executor: str) -> None:
    """Check ``compile``'s ``executor`` against how this process was started.

    Raises:
        ValueError: an unknown ``executor``, ``"torchrun"`` in a process torchrun did not
            start, or ``"processes"`` in one it did (every rank started workers of its own,
            and every rank waited out the timeout for them).
    """
    from pipeoptim.runtime.spmd import under_torchrun  # torch.distributed: only where needed

    if executor not in ("auto", "local", "processes", "torchrun"):
        raise ValueError(f"executor must be 'auto', 'local', 'processes' or 'torchrun', not {executor!r}")
    if executor == "torchrun" and not under_torchrun():
        raise ValueError(
            "executor='torchrun' but this process was not started by torchrun (RANK and WORLD_SIZE are "
            "unset): launch the script with torchrun --nproc-per-node N, or leave executor='auto'"
        )
    if executor == "processes" and under_torchrun():
        raise ValueError(
            "executor='processes' in a process torchrun started: each rank runs its own stage there; "
            "leave executor='auto' (or 'torchrun')"
        )


def start_executor(
    kind: str,
    spec: PipelineSpec,
    traced: TracedModel,
    device: torch.device,
    on_loss: Callable[[int, torch.Tensor], None],
    on_error: Callable[[BaseException], None],
    timeout: float,
) -> Executor:
    """Build the stages of ``spec`` and start the executor of ``kind`` (one of :data:`EXECUTORS`).

    ``on_loss(micro_batch, loss)`` receives each micro-batch loss of the last stage;
    ``on_error(exc)`` a failure of a worker process, held weakly where it is a bound method
    (the pipeline's: the executor it holds holding it back made a cycle, so a pipeline dropped
    without ``close()`` waited for the collector, whose finalisation of the queues first kept
    the workers from their close command: 10 s each; helper-130); ``timeout`` (seconds) bounds
    every wait between stages.
    """
    if kind == "local" and spec.data_parallel > 1:
        from pipeoptim.runtime.replicas import local_executor

        return _OnStageThreads(local_executor(spec, traced, device, on_loss), device)
    if kind == "local":
        stages = [build_stage(spec, traced, k, device) for k in range(spec.num_stages)]
        schedules = [spec.schedule(k) for k in range(spec.num_stages)]
        return _OnStageThreads(LocalExecutor(stages, schedules, on_loss), device)
    if kind == "torchrun":
        from pipeoptim.runtime.spmd import SPMDExecutor

        return SPMDExecutor(spec, on_loss, timeout, traced.gm)
    from pipeoptim.runtime.distributed import ProcessExecutor

    return ProcessExecutor(spec, on_loss, _weakly(on_error), timeout=timeout)


def _weakly(method: Callable[[BaseException], None]) -> Callable[[BaseException], None]:
    """``method`` without a strong reference to its object where it is a bound method (nothing
    is called once the object is gone)."""
    if not inspect.ismethod(method):
        return method
    ref = weakref.WeakMethod(method)

    def call(exc: BaseException) -> None:
        alive = ref()
        if alive is not None:
            alive(exc)

    return call


class _OnStageThreads:
    """A local executor whose stages compute with a worker process's torch threads on the CPU
    (:func:`pipeoptim.runtime.linkcost.stage_threads`), this process's own being restored after
    each call: kernels split their work by thread count and round by it, so with the caller's 2
    threads the local executor's losses differed from the processes executor's in the last bits
    (1 in 20 of README's CNN; found by a user's check, the tests ran with one thread). Every
    other attribute is the executor's own."""

    _COMPUTING = frozenset({"submit", "wait_loss", "flush", "forward_only"})

    def __init__(self, executor: Any, device: torch.device) -> None:
        self._executor = executor
        self._device = device

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._executor, name)
        if name not in self._COMPUTING:
            return value

        def on_stage_threads(*args: Any, **kwargs: Any) -> Any:
            with stage_threads("local", self._device):
                return value(*args, **kwargs)

        return on_stage_threads
