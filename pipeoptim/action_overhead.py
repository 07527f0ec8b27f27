"""The runtime's own CPU time per action, for the plan's cost model (``action_overhead``).

An action (a micro-batch's forward, backward or optimizer step on one stage) costs more than
the compute the profile measures: the Python between the schedule, the channel and the stage,
posting and retiring sends and receives, the transport's threads and, with the ``processes``
executor, the driving process that hands out every mini-batch and collects the losses on
the same machine. :func:`measure_action_overhead` runs the real runtime on a model with almost
no compute (one ``Linear(8, 8)`` and ReLU per stage) and counts the CPU time of every
process, driver included, beyond the stages' profiled compute and optimizer work, per action.
It feeds :class:`pipeoptim.compiler.costmodel.CostConfig` through
``pipeoptim.compile(..., action_overhead=...)``, as :func:`pipeoptim.runtime.linkcost.measure_link`
feeds the latency and bandwidth.

On this project's 2-core CPU machine (gloo, 2 stages) it measured 0.28 ms per action in
the throughput run of 2026-12-07 (``benchmarks/results/throughput.md``: 277 us) and 0.40-0.48
ms three times under a load average of 4 the same day: 0.8-1.4 ms per stage and mini-batch of
asynchronous 1F1B.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeoptim.compile_pipeline import compile as compile_pipeline
from pipeoptim.compiler.plan import Plan


def overhead_per_action(
    cpu_seconds: float, mini_batches: int, plan: Plan, actions_per_mini_batch: int
) -> float:
    """Seconds per action of ``cpu_seconds`` (all processes' CPU time over ``mini_batches``)
    beyond the plan's profiled forward, backward and weight work of every stage, spread over
    the ``actions_per_mini_batch`` actions of each stage (never below 0).

    Raises:
        ValueError: no mini-batch or no action.
    """
    if mini_batches < 1 or actions_per_mini_batch < 1:
        raise ValueError("need at least one mini-batch and one action per mini-batch")
    profiled = sum(s.fwd_s + s.bwd_s + s.update_s for s in plan.stages)
    beyond = cpu_seconds / mini_batches - profiled
    return max(0.0, beyond / (plan.num_stages * actions_per_mini_batch))


def measure_action_overhead(
    stages: int = 2, mini_batches: int = 200, warmup: int = 20, timeout: float = 120.0
) -> float:
    """The runtime's CPU seconds per action with the ``processes`` executor (module docstring).

    Runs ``stages`` worker processes (one thread each, gloo on the CPU) through ``warmup``
    then ``mini_batches`` mini-batches of PipeOptim's asynchronous 1F1B (a forward, a
    backward and a step per stage and mini-batch) and returns :func:`overhead_per_action` of
    the workers' and the driver's CPU time (``time.process_time`` in each process).

    Raises:
        ValueError: ``stages`` or ``mini_batches`` below 1, ``warmup`` below 0.
        PipelineError: a worker failed or did not answer within ``timeout`` seconds (and
            what ``pipeoptim.compile`` raises for ``stages``).
    """
    if stages < 1 or mini_batches < 1 or warmup < 0:
        raise ValueError(
            f"need stages >= 1, mini_batches >= 1 and warmup >= 0, got {stages}, {mini_batches}, {warmup}"
        )
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[layer for _ in range(stages) for layer in (nn.Linear(8, 8), nn.ReLU())])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    inputs, targets = torch.randn(64, 8, generator=generator), torch.randn(64, 8, generator=generator)
    with (
        tempfile.TemporaryDirectory(prefix="pipeoptim-overhead-") as profiles,
        compile_pipeline(
            model,
            optimizer,
            stages,
            example_inputs=inputs,
            loss_fn=F.mse_loss,
            executor="processes",
            profile_dir=profiles,
            timeout=timeout,
        ) as pipe,
    ):
        for _ in range(warmup):
            pipe.step(inputs, targets)
        pipe.flush()
        before = _cpu_seconds(pipe._executor.cpu_seconds())
        for _ in range(mini_batches):
            pipe.step(inputs, targets)
        pipe.flush()
        used = _cpu_seconds(pipe._executor.cpu_seconds()) - before
        plan = pipe.plan
    return overhead_per_action(used, mini_batches, plan, 3)


def _cpu_seconds(workers: Sequence[float]) -> float:
    """The workers' CPU seconds and this (the driving) process's."""
    return sum(workers) + time.process_time()
