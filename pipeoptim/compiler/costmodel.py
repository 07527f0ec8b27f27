"""The cost model: stage time and stage memory of an assignment of graph nodes to stages.

Every partitioner (the ILP, the baselines, the dynamic program, brute force) is judged by
:func:`evaluate`, so their numbers compare like with like.

Stage time (seconds per micro-batch) of stage k::

    T_k = sum of fwd_s + bwd_s of its nodes                                     (compute)
          + P_k * update_s_per_byte(k)                                           (update)
          + (A[k-1] + G[k-1] + A[k] + G[k]) / bandwidth + latency_s * messages_k   (comm)
          + action_overhead_s * actions per micro-batch                          (overhead)
          + exposed(P_k * 2(R-1)/R / allreduce bandwidth + n_k * allreduce latency, bwd_k, n_k)
            * steps per micro-batch                                               (R replicas)

where ``exposed`` is the part of the replicas' all-reduce the last backward before the step
does not hide (:func:`pipeoptim.compiler.overlap.exposed_allreduce_seconds`; ``n_k`` gradient
buckets of ``P_k``, an all-reduce each). The partitioners place cuts with the all-reduce's
bytes (:meth:`CostConfig.work_s`), an upper bound of their exposed part; its fixed cost is
added to the stage times they report.
``A[b]`` are the activation bytes crossing boundary b (between stage b and b+1) forward
and ``G[b]`` the gradient bytes crossing it backward. A value produced at stage i and read at
stage j > i crosses every boundary i..j-1 (it is passed on by the stages in between), and is
counted on each. Stage k receives ``A[k-1]`` and ``G[k]`` and sends ``A[k]`` and ``G[k-1]``.
``P_k`` are its parameter bytes: the optimizer steps once per micro-batch in asynchronous 1F1B
and once per M micro-batches when a mini-batch is split (GPipe, 1F1B, 2BW), PipeOptim and
SpecTrain compute their predicted weights before every forward, PipeDream copies the weights
before every step (weight stashing) and 2BW before every update (its shadow version)
(:meth:`CostConfig.update_s_per_byte`; costs per byte measured with
:func:`pipeoptim.update_cost.measure_update_cost`, on one CPU while the layout's other ranks
step beside, as they share its memory: :mod:`pipeoptim.update_pricing`), each where it happens
(:meth:`pipeoptim.methods.Method.weight_work`: not at the last stage of PipeOptim and PipeDream,
whose version difference is 0; SpecTrain's backward predicts too from stage 2 on); the
partitioners price a stage's parameters at its own weight cost per byte. Communication is the
α + β·bytes model (Hockney): ``latency_s`` (α) for each of the ``messages_k`` messages stage k sends or
receives per micro-batch (activations and gradients at each of its boundaries, two or four)
and ``1 / bandwidth`` (β) per byte (:func:`pipeoptim.runtime.linkcost.measure_link` measures
both on the transport in use). ``action_overhead_s`` is the runtime's own time per action
(forward, backward, step: the Python between schedule, channel and stage). The partitioners
place the cuts by compute, update, bytes and each stage's latency (set by its position:
:meth:`CostConfig.latency_at`; without it the middle stages' four messages against the ends'
two were left out, and a 6/6/6/6 split of a chain was called optimal where 7/5/5/7 was 11%
faster: helper-129); the action overhead, the same at every stage, is added to the stage
times they report.

Where the N·R ranks share ``cores`` processors (ranks on one machine's CPU cores, one thread
each), the machine also has to run all their work: one mini-batch takes at least
``R · units · Σ_k T_k / cores`` (:func:`pipeoptim.compiler.summary.summarize`).

A shared parameter (tied embeddings,
:mod:`pipeoptim.compiler.shared`) is no boundary value: each stage reading it holds a copy,
counted in its ``P_k`` (and its memory below), and sums the copies' gradients once per step:
``S_k = (h - 1) · B`` bytes sent and as many received for a parameter of ``B`` bytes held by
``h`` stages (an all-gather), taking ``2 · S_k / bandwidth`` seconds per step. Asynchronous
methods overlap it with the next D mini-batches (:mod:`pipeoptim.runtime.shared`), so it is not
in ``T_k``; methods that flush add it once per mini-batch
(:func:`pipeoptim.compiler.summary.summarize`). The partitioners optimise ``T_k`` and the
memory with a shared parameter's bytes at every node reading it, and
:func:`pipeoptim.compiler.plan.make_plan` checks the memory limit with every copy counted
(:mod:`pipeoptim.compiler.held_memory`).

Stage memory (bytes) of stage k of N::

    params * (1 + 1 + f_opt + c_k) + buffers + in_flight_k * saved_activations

with one gradient copy, ``f_opt`` optimizer-state copies (:mod:`~pipeoptim.compiler.optimizer_state`),
``c_k`` extra weight copies of the method (:meth:`pipeoptim.methods.Method.extra_weight_copies`)
and ``in_flight_k`` micro-batches whose activations the stage keeps
(:meth:`pipeoptim.methods.Method.in_flight`, ``N - k`` under 1F1B).

Planned recomputation (activation checkpointing of a whole stage, Chen et al., "Training Deep
Nets with Sublinear Memory Cost", arXiv:1604.06174): with
:attr:`CostConfig.recompute` a stage whose memory exceeds :attr:`CostConfig.memory_limit`
may instead keep, per micro-batch in flight, only the activations it receives and reads
(``I_k`` bytes, :mod:`~pipeoptim.compiler.boundaries`; stage 0: the model inputs) and recompute its
forward before each backward, which then holds one micro-batch's saved activations at a time::

    activations_k = in_flight_k * I_k + saved_activations       T_k += fwd_s of its nodes

A stage recomputes only where the limit binds without it and recomputation lowers its
memory (at equal time no recomputation is preferred; :func:`evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeoptim.compiler.boundaries import boundary_bytes, saved_activation_bytes, stage_input_bytes
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.overlap import bucket_count, exposed_allreduce_seconds
from pipeoptim.compiler.shared import reduce_bytes, shared_parameters
from pipeoptim.compiler.stage_stats import StageStats
from pipeoptim.methods import Method, get_method
from pipeoptim.units import MAX_BYTES, MAX_SECONDS, MIN_BANDWIDTH, is_bandwidth, is_seconds

#: :class:`CostConfig`'s fields in seconds (``allreduce_latency_s`` may be ``None``)
SECONDS_FIELDS = (
    *("latency_s", "action_overhead_s", "step_s_per_byte", "predict_s_per_byte"),
    *("copy_s_per_byte", "allreduce_latency_s"),
)


@dataclass(frozen=True)
class CostConfig:
    """What a plan is for.

    Attributes:
        num_stages: N, the number of pipeline stages (one device each).
        method: pipeline method name (see :mod:`pipeoptim.methods`); decides weight copies
            and activations in flight.
        micro_batches: M, micro-batches per mini-batch (GPipe, 1F1B, 2BW).
        bandwidth: bytes per second between neighbouring stages; ``None`` means
            communication is free.
        memory_limit: bytes per stage; ``None`` means unlimited.
        opt_state_factor: optimizer-state bytes per parameter byte.
        step_s_per_byte: seconds of one optimizer step per parameter byte.
        predict_s_per_byte: seconds of one weight prediction per parameter byte.
        copy_s_per_byte: seconds of one weight copy per parameter byte (weight stashing,
            PipeDream-2BW's shadow version).
        latency_s: α, seconds per message between stages (0: not modelled).
        action_overhead_s: seconds of runtime overhead per action (0: not modelled).
        cores: processors the N·R ranks share, e.g. CPU cores for ranks with one thread each
            (``None``: every rank has its own device).
        cores_pinned: the ranks are bound to the :attr:`cores` in turn, rank r to core
            ``r mod cores`` (:func:`pipeoptim.runtime.affinity.rank_cores`), so where the
            ranks do not divide evenly a core runs more of them than another.
        data_parallel: R, replicas of the pipeline (:mod:`pipeoptim.compiler.layouts`): each
            stage's replicas all-reduce its gradients before every step, a ring all-reduce
            moving ``2(R−1)/R`` bytes per gradient byte (Patarasuk and Yuan, JPDC 2009) at
            :attr:`allreduce_bandwidth`, each bucket's all-reduce at a fixed cost of
            :attr:`allreduce_latency_s`, overlapped with the last backward before the step
            where its buckets allow (:mod:`pipeoptim.compiler.overlap`).
        allreduce_bandwidth: bytes per second of the replicas' ring all-reduce; ``None``:
            :attr:`bandwidth`.
        allreduce_latency_s: seconds each all-reduce (one per bucket and step) costs whatever
            its size; ``None``: its ring's ``2(R−1)`` messages of :attr:`latency_s`
            (:func:`pipeoptim.runtime.linkcost.measure_allreduce` measures both).
        recompute: whether the planners may let a stage recompute its activations where
            :attr:`memory_limit` binds (see the module docstring).
    """

    num_stages: int
    method: str = "pipeoptim"
    micro_batches: int = 1
    bandwidth: float | None = None
    memory_limit: int | None = None
    opt_state_factor: float = 1.0
    step_s_per_byte: float = 0.0
    predict_s_per_byte: float = 0.0
    copy_s_per_byte: float = 0.0
    latency_s: float = 0.0
    action_overhead_s: float = 0.0
    cores: float | None = None
    cores_pinned: bool = False
    data_parallel: int = 1
    allreduce_bandwidth: float | None = None
    allreduce_latency_s: float | None = None
    recompute: bool = False

    def __post_init__(self) -> None:
        """Raises ValueError for a per-message, per-action or per-byte cost that is not a number
        of seconds from 0 to :data:`MAX_SECONDS` (an infinite latency, or 1e308 s, made every
        plan's time NaN or infinite and its JSON invalid), or a bandwidth outside
        :data:`pipeoptim.units.MIN_BANDWIDTH` to :data:`pipeoptim.units.MAX_BYTES` bytes/s
        (1e-300 made a boundary's seconds infinite), or a count of stages, micro-batches or
        replicas that is not a positive integer (a hand-edited plan's ``"2"`` failed deep in
        compile, helper-158)."""
        for name in ("num_stages", "micro_batches", "data_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in SECONDS_FIELDS:
            value = getattr(self, name)
            if not is_seconds(value) and not (name == "allreduce_latency_s" and value is None):
                raise ValueError(
                    f"{name} must be a number of seconds from 0 to {MAX_SECONDS:.0f}, got {value!r}"
                )
        for name in ("bandwidth", "allreduce_bandwidth"):
            value = getattr(self, name)
            if value is not None and not is_bandwidth(value):
                raise ValueError(
                    f"{name} must be None (free) or {MIN_BANDWIDTH:.0f} to {MAX_BYTES:.0e} bytes/s, "
                    f"got {value!r}"
                )

    @property
    def method_info(self) -> Method:
        return get_method(self.method)

    @property
    def steps_per_micro_batch(self) -> float:
        """Optimizer steps per micro-batch: 1 in asynchronous 1F1B, 1/M where a mini-batch is split."""
        method = self.method_info
        return 1.0 if method.asynchronous and not method.micro_batched else 1.0 / self.micro_batches

    def weight_s_per_byte(self, stage: int) -> float:
        """Seconds per parameter byte and micro-batch the weight policy spends at ``stage``:
        its predictions per forward and weight copies per optimizer step
        (:meth:`pipeoptim.methods.Method.weight_work`)."""
        predictions, copies = self.method_info.weight_work(stage, self.num_stages)
        return (
            predictions * self.predict_s_per_byte + copies * self.copy_s_per_byte * self.steps_per_micro_batch
        )

    def update_s_per_byte(self, stage: int) -> float:
        """Seconds per parameter byte and micro-batch of optimizer steps and weight policy at ``stage``."""
        return self.step_s_per_byte * self.steps_per_micro_batch + self.weight_s_per_byte(stage)

    def messages(self, stage: int) -> int:
        """Messages ``stage`` sends or receives per micro-batch: activations and gradients at
        each of its boundaries (2 at the first and last stage, 4 between, 0 alone)."""
        return 2 * ((stage > 0) + (stage < self.num_stages - 1))

    def latency_at(self, stage: int) -> float:
        """Seconds of latency per micro-batch at ``stage``: :attr:`latency_s` per message
        (:meth:`messages`), by its position alone; the partitioners count it with each stage."""
        return self.latency_s * self.messages(stage)

    @property
    def allreduce_fixed_s(self) -> float:
        """Seconds per micro-batch of one bucket's all-reduce beyond its bytes (0 with one
        replica): :attr:`allreduce_latency_s` (a late wake-up of a blocked rank costs each
        ~1.5-3 ms on a 2-core VM, whatever its size, and at R=4 1.2-2x what it does at R=2,
        helper-145), else the ring's ``2(R−1)`` messages of ``latency_s`` (Patarasuk and Yuan,
        JPDC 2009); once per step and bucket (the runtime issues an all-reduce per bucket)."""
        if self.data_parallel <= 1:
            return 0.0
        fixed = self.allreduce_latency_s
        if fixed is None:
            fixed = 2.0 * (self.data_parallel - 1) * self.latency_s
        return fixed * self.steps_per_micro_batch

    @property
    def allreduce_s_per_byte(self) -> float:
        """Seconds per parameter byte and micro-batch of the replicas' gradient all-reduce:
        ``2(R−1)/R / bandwidth`` per step (ring all-reduce), 0 with one replica."""
        bandwidth = self.allreduce_bandwidth if self.allreduce_bandwidth is not None else self.bandwidth
        if self.data_parallel <= 1 or bandwidth is None:
            return 0.0
        ring = 2.0 * (self.data_parallel - 1) / self.data_parallel
        return ring / bandwidth * self.steps_per_micro_batch

    def work_s(self, node: Any) -> float:
        """A node's seconds per micro-batch on any stage: forward, backward, its parameters'
        optimizer steps and their gradient all-reduce between replicas. The weight policy's
        work depends on the stage (:meth:`weight_s_per_byte`) and is not included."""
        per_byte = self.step_s_per_byte * self.steps_per_micro_batch + self.allreduce_s_per_byte
        return node.fwd_s + node.bwd_s + node.param_bytes * per_byte

    def weight_factor(self, stage: int) -> float:
        """Bytes held at stage ``stage`` per parameter byte (weights, gradient, state, copies)."""
        copies = self.method_info.extra_weight_copies(stage, self.num_stages)
        return 2.0 + self.opt_state_factor + copies

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose saved activations stage ``stage`` holds at once."""
        return self.method_info.in_flight(stage, self.num_stages, self.micro_batches)

    def comm_s(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` at :attr:`bandwidth`."""
        return 0.0 if self.bandwidth is None else nbytes / self.bandwidth


def check_assignment(graph: CostGraph, stage_of: Sequence[int], num_stages: int) -> None:
    """Raise ``ValueError`` if an edge runs backwards or a stage index is out of range."""
    if len(stage_of) != len(graph.nodes):
        raise ValueError(f"assignment has {len(stage_of)} entries for {len(graph.nodes)} nodes")
    for i, node in enumerate(graph.nodes):
        if not 0 <= stage_of[i] < num_stages:
            raise ValueError(f"node {node.name} assigned to stage {stage_of[i]} of {num_stages}")
        for inp in node.inputs:
            if stage_of[graph.index(inp)] > stage_of[i]:
                raise ValueError(f"edge {inp} -> {node.name} runs from a later stage backwards")


def evaluate(
    graph: CostGraph,
    stage_of: Sequence[int],
    config: CostConfig,
    recompute: Sequence[bool] | str = "limit",
) -> list[StageStats]:
    """Per-stage costs of assigning node ``i`` to stage ``stage_of[i]``.

    Args:
        recompute: which stages recompute (module docstring), with :attr:`CostConfig.recompute`:
            ``"limit"``, those over ``config.memory_limit`` that recomputation makes smaller
            (what the planners choose); ``"least"``, every stage it makes smaller (the plan
            with the least memory); or one flag per stage, as given.

    Raises:
        ValueError: the assignment sends an edge backwards or names a stage out of range, or
            ``recompute`` is another word or has not one flag per stage.
    """
    n = config.num_stages
    check_assignment(graph, stage_of, n)
    if recompute not in ("limit", "least") and (isinstance(recompute, str) or len(recompute) != n):
        raise ValueError(f"recompute must be 'limit', 'least' or {n} flags, one per stage, not {recompute!r}")
    acts, grads = boundary_bytes(graph, stage_of, n)
    inputs = stage_input_bytes(graph, stage_of, n)
    shared = shared_parameters(graph, stage_of)
    stats = []
    for k in range(n):
        members = [i for i, s in enumerate(stage_of) if s == k]
        nodes = [graph.nodes[i] for i in members]
        held = [graph.nodes[i] for i, holders in shared.items() if k in holders]
        own = [x for i, x in zip(members, nodes) if i not in shared]
        params = sum(x.param_bytes for x in own + held)
        fwd = sum(x.fwd_s for x in nodes)
        bwd = sum(x.bwd_s for x in nodes)
        a_in, g_in = (acts[k - 1], grads[k - 1]) if k > 0 else (0, 0)
        a_out, g_out = (acts[k], grads[k]) if k < n - 1 else (0, 0)
        recv, send = a_in + g_out, a_out + g_in
        comm = config.comm_s(recv + send) + config.latency_at(k)
        overhead = config.action_overhead_s * (2 + config.steps_per_micro_batch)
        reduce = sum(reduce_bytes(graph.nodes[i].param_bytes, len(h)) for i, h in shared.items() if k in h)
        update = params * config.update_s_per_byte(k)
        buckets = bucket_count([x.param_bytes for x in (own + held)[::-1] if x.param_bytes])  # backward order
        allreduce = exposed_allreduce_seconds(
            params * config.allreduce_s_per_byte + (buckets * config.allreduce_fixed_s if params else 0.0),
            bwd * config.steps_per_micro_batch,
            buckets,
        )
        copies = config.method_info.extra_weight_copies(k, n)
        opt = int(params * config.opt_state_factor)
        buffers = sum(x.buffer_bytes for x in nodes)
        held_names = [name for x in held for name in x.params]
        saved = saved_activation_bytes(nodes, held_names)
        activations = config.in_flight(k) * saved
        memory = params * 2 + opt + params * copies + buffers + activations
        recomputed = memory - activations + config.in_flight(k) * inputs[k] + saved
        if isinstance(recompute, str):
            limit = config.memory_limit if recompute == "limit" else -1
            again = config.recompute and limit is not None and memory > limit and recomputed < memory
        else:
            again = bool(recompute[k])
        if again:
            activations += recomputed - memory
            memory = recomputed
        again_s = sum(x.again_s for x in nodes) if again else 0.0
        stats.append(
            StageStats(
                index=k,
                num_nodes=len(nodes),
                first_node=nodes[0].name if nodes else "",
                last_node=nodes[-1].name if nodes else "",
                param_bytes=params,
                fwd_s=fwd,
                bwd_s=bwd,
                recv_bytes=recv,
                send_bytes=send,
                comm_s=comm,
                update_s=update,
                weight_bytes=params,
                grad_bytes=params,
                opt_state_bytes=opt,
                copy_bytes=params * copies,
                buffer_bytes=buffers,
                activation_bytes=activations,
                memory_bytes=memory,
                time_s=fwd + bwd + comm + update + overhead + allreduce + again_s,
                overhead_s=overhead,
                shared_bytes=reduce,
                shared_s=config.comm_s(2 * reduce),
                allreduce_s=allreduce,
                recompute=again,
                recompute_s=again_s,
            )
        )
    return stats
