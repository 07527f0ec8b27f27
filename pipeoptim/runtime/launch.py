"""Executor selection: start the stages of a pipeline where ``executor=`` says.

``"local"``: every stage in this process (:class:`~pipeoptim.runtime.executor.LocalExecutor`);
``"processes"``: one worker process per stage
(:class:`~pipeoptim.runtime.distributed.ProcessExecutor`); ``"torchrun"``: this process is one
rank of a torchrun job (:class:`~pipeoptim.runtime.spmd.SPMDExecutor`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeoptim.compiler.trace import TracedModel
from pipeoptim.runtime.build import PipelineSpec, build_stage
from pipeoptim.runtime.executor import LocalExecutor

EXECUTORS = ("local", "processes", "torchrun")


def start_executor(
    kind: str,
    spec: PipelineSpec,
    traced: TracedModel,
    device: torch.device,
    on_loss: Callable[[int, torch.Tensor], None],
    on_error: Callable[[BaseException], None],
    timeout: float,
    owns_group: bool,
) -> Any:
    """Build the stages of ``spec`` and start the executor of ``kind`` (one of :data:`EXECUTORS`).

    ``on_loss(micro_batch, loss)`` receives each micro-batch loss of the last stage;
    ``on_error(exc)`` a failure of a worker process; ``timeout`` (seconds) bounds every wait
    between stages; ``owns_group``: under torchrun, whether the process group was created by
    pipeoptim (and is destroyed on close).
    """
    if kind == "local":
        stages = [build_stage(spec, traced, k, device) for k in range(spec.num_stages)]
        return LocalExecutor(stages, spec.schedule(), on_loss)
    if kind == "torchrun":
        from pipeoptim.runtime.spmd import SPMDExecutor

        return SPMDExecutor(spec, on_loss, timeout, owns_group)
    from pipeoptim.runtime.distributed import ProcessExecutor

    return ProcessExecutor(spec, on_loss, on_error, timeout=timeout)
