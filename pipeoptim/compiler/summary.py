"""A plan's summary figures: bottleneck, lower bound, balance, throughput, bubble, memory.

Predicted from the per-stage times of :func:`pipeoptim.compiler.costmodel.evaluate`: the
steady-state throughput of asynchronous 1F1B (PipeDream, Narayanan et al., SOSP 2019) is one
mini-batch per bottleneck stage time; schedules that flush every mini-batch (GPipe, Huang et
al., NeurIPS 2019; 1F1B with flush) add the warm-up and cool-down of ``N - 1`` micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, StageStats
from pipeoptim.compiler.overlap import BUCKET_BYTES


def summarize(graph: CostGraph, stats: Sequence[StageStats], config: CostConfig) -> dict[str, Any]:
    """Summary figures of a plan.

    - ``bottleneck_s``: the slowest stage's time per micro-batch (seconds).
    - ``lower_bound_s``: ``max(total work / N, largest node)`` (work: forward, backward and
      optimizer steps, :meth:`CostConfig.work_s`; of the replicas' all-reduce only what no
      overlap with the backward can hide) plus what every stage pays whatever the plan (its
      actions' runtime overhead and, with N > 1, one boundary's two messages of latency); no
      plan beats it.
    - ``balance_ratio``: ``bottleneck_s / lower_bound_s`` (1.0 is perfect).
    - ``throughput_per_s``: predicted steady-state mini-batches per second: ``1 / T`` for
      asynchronous 1F1B, ``1 / ((M + N - 1) T + R)`` for schedules that flush every mini-batch
      (GPipe, 1F1B), ``1 / (M T)`` for 2BW; ``R`` is the slowest holder's gradient sum of the
      shared parameters (``shared_s``, at the step the stages take together).
      Where the N·R ranks share ``config.cores`` processors, also at least
      ``R · units · Σ_k T_k / cores`` seconds per mini-batch (the machine runs all the ranks'
      work), ``units`` being the micro-batches of a replica's share of the mini-batch (1 in
      asynchronous 1F1B) and R the replicas (``config.data_parallel``); with the ranks bound
      to the cores in turn (``config.cores_pinned``), at least ``units`` times the busiest
      core's sum of its ranks' stage times (3 stages on 2 cores: stages 0 and 2 on one, which
      set the time; predicted 88.9/s against 48-52 measured, helper-140).
    - ``bubble_fraction``: share of device time idle in that steady state, from the
      schedule's warm-up and cool-down and from unequal stage times.
    - ``cores_bound``: whether the shared cores, not the bottleneck stage, set the throughput.
    - ``num_stages``, ``data_parallel``: the layout planned, N stages × R replicas.
    - ``loss``: the loss's ``fwd_s`` and ``bwd_s`` per micro-batch priced on the last stage
      (:mod:`pipeoptim.loss_cost`), ``None`` where the profile leaves the loss out.
    """
    n, m = config.num_stages, config.micro_batches
    bottleneck = max(s.time_s for s in stats)
    # the replicas' all-reduce is left out of the nodes' work, as the backward may hide it; of
    # a stage's all-reduce A (P_k bytes in n_k buckets of at most B bytes, n_k = 1 where
    # P_k <= B) at least A / n_k shows (pipeoptim.compiler.overlap). Two buckets in a row hold
    # over B (bucket_starts), so n_k <= 2 P_k / B + 1 and A / n_k >= c·min(P_k, B/3) + f with c
    # seconds per byte and f the fixed cost of each bucket's all-reduce: all stages together
    # show at least c·min(P, B/3) + f (left out, f made a 1-stage plan's balance read 2.0)
    per_byte, params = config.allreduce_s_per_byte, sum(x.param_bytes for x in graph.nodes)
    work = [config.work_s(x) - x.param_bytes * per_byte for x in graph.nodes]
    shown = per_byte * min(params, BUCKET_BYTES / 3) + (config.allreduce_fixed_s if params else 0.0)
    # what every stage pays whatever the plan: its actions' overhead, and with N > 1 at least
    # one boundary's two messages (activations and gradients)
    fixed = config.action_overhead_s * (2 + config.steps_per_micro_batch) + (
        2 * config.latency_s if n > 1 else 0.0
    )
    lower = max((sum(work) + shown) / n, max(work, default=0.0)) + fixed
    method = config.method_info
    if method.asynchronous:
        units = m if method.micro_batched else 1
        per_batch = units * bottleneck
    else:
        units = m
        per_batch = (m + n - 1) * bottleneck + max(s.shared_s for s in stats)
    busy = sum(s.time_s for s in stats) * units * config.data_parallel  # over all N·R ranks
    shared = 0.0 if config.cores is None else busy / config.cores
    ranks = n * config.data_parallel
    whole = config.cores is not None and config.cores >= 1 and config.cores == int(config.cores)
    if whole and config.cores_pinned and ranks > config.cores:  # bound to whole cores only
        per_core = [0.0] * int(config.cores)  # rank r = replica · N + stage, on core r mod cores
        for r in range(ranks):
            per_core[r % len(per_core)] += stats[r % n].time_s * units
        shared = max(shared, *per_core)
    cores_bound = shared > per_batch
    if cores_bound:
        per_batch = shared
    return {
        "bottleneck_s": bottleneck,
        "bottleneck_stage": max(stats, key=lambda s: s.time_s).index,
        "lower_bound_s": lower,
        "balance_ratio": bottleneck / lower if lower > 0 else 1.0,
        "throughput_per_s": 1.0 / per_batch if per_batch > 0 else float("inf"),
        "bubble_fraction": 1.0 - busy / (n * config.data_parallel * per_batch) if per_batch > 0 else 0.0,
        "max_memory_bytes": max(s.memory_bytes for s in stats),
        "cores_bound": cores_bound,
        "num_stages": n,
        "data_parallel": config.data_parallel,
        "loss": graph.info.get("loss"),
    }
