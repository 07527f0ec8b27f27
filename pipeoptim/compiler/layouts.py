"""Choosing the layout: G devices as N pipeline stages × R data-parallel replicas.

A deeper pipeline stops paying once its bottleneck stage no longer shrinks (a large node,
communication); replicating a shallower pipeline then uses the devices better, at the price
of each stage's gradient all-reduce (PipeDream, Narayanan et al. SOSP 2019, replicates
stages; Megatron-LM and DeepSpeed combine data and pipeline parallelism). The replication
here is uniform: every stage has R replicas (:mod:`pipeoptim.runtime.replicas`).

Every layout with ``N·R ≤ G`` is planned for the same mini-batch and the one with the
highest predicted throughput (mini-batches per second) is chosen; ties go to fewer devices,
then fewer replicas.

**The mini-batch.** The cost graph is profiled on one micro-batch of ``b`` rows. The
mini-batch has ``B = b·M_G`` rows, ``M_G`` being the micro-batches one pipeline over all G
devices splits it into (``micro_batches``; by default G for GPipe, 1F1B and 2BW, as
``compile`` does, and 1 for asynchronous 1F1B). Layout (N, R) gives each replica ``B/R``
rows in ``M_N`` micro-batches (``micro_batches``, or N, or 1), so its micro-batches have
``b·M_G / (R·M_N)`` rows. Forward and backward seconds, boundary values and saved
activations are scaled by that factor (linear in the rows; small micro-batches use a GPU
less well than this assumes), parameters, optimizer steps and predictions are not.

Where a *profiler* is given instead of one cost graph (``compile(..., data_parallel="auto")``,
``benchmarks/layouts.py``), each layout is planned from a profile of its own micro-batch,
``ceil(B / (R·M_N))`` rows of the mini-batch of ``B`` rows, exactly as ``compile`` plans that
layout: the prediction of a layout is then the one its compiled plan shows.

**Costs of replication.** Each stage adds its ring all-reduce, ``2(R−1)/R · P_k`` bytes at
the all-reduce's bandwidth plus its fixed cost per bucket and optimizer step (the α + β model
of :attr:`pipeoptim.compiler.costmodel.CostConfig.allreduce_s_per_byte` and
``allreduce_fixed_s``), of which the part the last backward before the step does not hide
counts in the stage's time (:mod:`pipeoptim.compiler.overlap`); the partitioner balances the
whole all-reduce with the rest of the stage's work. Where the ranks
share a machine's cores (``config.cores``, CPU ranks), all N·R ranks' work counts against
them (:func:`pipeoptim.compiler.summary.summarize`). Memory per device is that of one stage
of one replica (each device holds one, a shared parameter's copy at every stage reading it),
checked against the limit as for one pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tabulate import tabulate

from pipeoptim.compiler.costgraph import CostGraph, CostNode
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.plan import Plan, make_plan
from pipeoptim.errors import InfeasibleMemoryError, PlanError
from pipeoptim.methods import check_micro_batches, get_method
from pipeoptim.units import column_bytes, format_bytes, plural


@dataclass
class LayoutOption:
    """One layout and its plan (``plan is None`` where it is infeasible: ``reason`` says why).

    Attributes:
        stages: N, pipeline stages.
        replicas: R, data-parallel replicas of the pipeline.
        micro_batches: M, micro-batches each replica splits its share into.
        rows_factor: rows of a micro-batch over the profiled micro-batch's (1.0 where the
            layout was profiled on its own micro-batch).
        rows: rows of each of its micro-batches.
        min_feasible_bytes: where the memory limit rules the layout out, the smallest per-device
            limit (bytes) it fits in; else ``None``.
        error: why it is infeasible, in full (raised where it was the only layout asked for).
        fix: what would make it feasible, where that is known ("" otherwise).
    """

    stages: int
    replicas: int
    micro_batches: int
    rows_factor: float
    rows: float = 0.0
    plan: Plan | None = None
    reason: str = ""
    min_feasible_bytes: int | None = None
    error: PlanError | None = field(default=None, repr=False)
    fix: str = ""

    @property
    def devices(self) -> int:
        return self.stages * self.replicas

    @property
    def throughput_per_s(self) -> float:
        """Predicted mini-batches per second (0.0 where infeasible)."""
        return 0.0 if self.plan is None else float(self.plan.summary["throughput_per_s"])

    def to_dict(self) -> dict[str, Any]:
        summary = self.plan.summary if self.plan is not None else {}
        return {
            "stages": self.stages,
            "data_parallel": self.replicas,
            "micro_batches": self.micro_batches,
            "rows_factor": self.rows_factor,
            "rows": self.rows,
            "throughput_per_s": self.throughput_per_s,
            "bottleneck_s": summary.get("bottleneck_s"),
            "allreduce_s": None if self.plan is None else max(s.allreduce_s for s in self.plan.stages),
            "max_memory_bytes": summary.get("max_memory_bytes"),
            "feasible": self.plan is not None,
            "reason": self.reason,
        }


@dataclass
class LayoutChoice:
    """The chosen layout and every layout considered, best first."""

    chosen: LayoutOption
    options: list[LayoutOption] = field(default_factory=list)

    def table(self) -> str:
        """The layouts considered, best first (``*`` under ``chosen``: the chosen one). A ``set
        by`` column says whether the slowest stage or the cores the ranks share set a layout's
        predicted mini-batches/s (shown only where some layout's are the cores:
        :func:`pipeoptim.compiler.summary.summarize`); a ``note`` column says why a layout is
        infeasible (shown only where one is)."""
        rows = []
        feasible = [o.plan.summary["max_memory_bytes"] for o in self.options if o.plan is not None]
        memory = iter(column_bytes(feasible))
        for o in self.options:
            sm = o.plan.summary if o.plan is not None else None
            rows.append(
                [
                    "*" if o is self.chosen else "",
                    f"{o.stages} x {o.replicas}",
                    str(o.devices),
                    str(o.micro_batches),
                    f"{o.throughput_per_s:.2f}" if sm is not None else "-",
                    "-" if sm is None else "shared cores" if sm.get("cores_bound") else "slowest stage",
                    f"{sm['bottleneck_s'] * 1e3:.3f}" if sm is not None else "-",
                    f"{max(s.allreduce_s for s in o.plan.stages) * 1e3:.3f}" if o.plan is not None else "-",
                    next(memory) if sm is not None else "-",
                    o.reason,
                ]
            )
        headers = [
            "chosen",
            "stages x replicas",
            "devices",
            "micro-batches",
            "mini-batches/s",
            "set by",
            "bottleneck ms",
        ]
        headers += ["all-reduce ms", "memory", "note"]
        align = ["left", "left"] + ["right"] * 3 + ["left"] + ["right"] * 3 + ["left"]
        cores_bound = any(o.plan is not None and o.plan.summary.get("cores_bound") for o in self.options)
        hidden = {headers.index("set by")} if not cores_bound else set()
        if not any(o.reason for o in self.options):  # every layout feasible: no empty note column
            hidden.add(headers.index("note"))
        keep = [i for i in range(len(headers)) if i not in hidden]
        headers, align = [headers[i] for i in keep], [align[i] for i in keep]
        rows = [[row[i] for i in keep] for row in rows]
        # the numbers as formatted above, aligned alike whether or not a row shows "-"
        return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True, colalign=align)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": self.chosen.stages,
            "data_parallel": self.chosen.replicas,
            "options": [o.to_dict() for o in self.options],
        }


def default_micro_batches(method: str, stages: int) -> int:
    """M when none is given: N for methods that split mini-batches (as ``compile``), else 1."""
    return stages if get_method(method).micro_batched else 1


def rows_factor(method: str, gpus: int, stages: int, replicas: int, micro_batches: int | None) -> float:
    """Rows of layout (N, R)'s micro-batches over the profiled micro-batch's (module docstring)."""
    m_all = micro_batches or default_micro_batches(method, gpus)
    m_layout = micro_batches or default_micro_batches(method, stages)
    return m_all / (replicas * m_layout)


def scale_rows(graph: CostGraph, factor: float) -> CostGraph:
    """``graph`` with every row-dependent cost times ``factor``: forward and backward seconds,
    output and gradient bytes and saved activations of every node but parameters
    (``get_attr``); parameter and buffer bytes stay."""
    if factor == 1.0:
        return graph

    def scaled(node: CostNode) -> CostNode:
        if node.op == "get_attr":
            return node
        saved = {k: v if k.startswith("param:") else round(v * factor) for k, v in node.saved.items()}
        return replace(
            node,
            fwd_s=node.fwd_s * factor,
            bwd_s=node.bwd_s * factor,
            out_bytes=round(node.out_bytes * factor),
            grad_bytes=round(node.grad_bytes * factor),
            saved_bytes=round(node.saved_bytes * factor),
            saved=saved,
        )

    return replace(graph, nodes=[scaled(n) for n in graph.nodes])


def candidates(gpus: int, stages: int | None = None, replicas: int | None = None) -> list[tuple[int, int]]:
    """Every ``(N, R)`` with ``N·R ≤ gpus``; only those with ``N = stages`` where it is given
    and with ``R = replicas`` where that is (both: that one layout).

    Raises:
        PlanError: a forced layout needs more than ``gpus`` devices.
    """
    if stages is not None and replicas is not None and stages * replicas > gpus:
        raise PlanError(
            f"{stages} stages x {replicas} replicas need {stages * replicas} devices but --gpus is "
            f"{gpus}: raise --gpus or lower --stages/--data-parallel"
        )
    for what, value in (("stages", stages), ("data-parallel", replicas)):
        if value is not None and value > gpus:
            raise PlanError(
                f"--{what} {value} needs {value} devices but --gpus is {gpus}: raise --gpus to "
                f"{value} or lower --{what}"
            )
    pairs = [(n, r) for n in range(1, gpus + 1) for r in range(1, gpus // n + 1)]
    return [(n, r) for n, r in pairs if stages in (None, n) and replicas in (None, r)]


#: ``profile(rows)``: the cost graph of the model profiled on a micro-batch of ``rows`` rows
Profiler = Callable[[int], CostGraph]


def layout_cores(cores: float | None, devices: int) -> float | None:
    """The ``cores`` of a layout's config: the machine's shared processors where they are fewer
    than its ``devices`` ranks, else ``None`` (as :func:`pipeoptim.runtime.linkcost.shared_cores`)."""
    return cores if cores is not None and cores < devices else None


def plan_layout(
    graph: CostGraph | Profiler,
    config: CostConfig,
    gpus: int,
    stages: int,
    replicas: int,
    micro_batches: int | None,
    plan: Callable[[CostGraph, CostConfig], Plan] = make_plan,
    mini_batch: int | None = None,
) -> LayoutOption:
    """Plan one layout (``config`` gives method, bandwidths, latency, overheads, memory limit,
    update costs and the machine's shared cores; its stage count, micro-batches, replicas and
    cores are replaced). ``graph`` is one cost graph, scaled to the layout's rows, or a
    :data:`Profiler` called with them (then ``mini_batch``, the mini-batch's rows, is needed).
    An infeasible layout has ``plan=None``.

    Raises:
        ValueError: a profiler without ``mini_batch``.
    """
    m = micro_batches or default_micro_batches(config.method, stages)
    if isinstance(graph, CostGraph):
        factor = rows_factor(config.method, gpus, stages, replicas, micro_batches)
        rows: float = graph.batch_size * factor
    elif mini_batch is None:
        raise ValueError("plan_layout with a profiler needs mini_batch, the rows of one mini-batch")
    else:
        factor, rows = 1.0, math.ceil(mini_batch / (m * replicas)) if mini_batch >= m * replicas else 0.0
    option = LayoutOption(stages, replicas, m, factor, rows)
    if rows < 1:
        option.reason = f"micro-batches of {rows:.2g} rows (the mini-batch has too few)"
        option.fix = "use a larger batch or fewer micro-batches"
        fewer = "fewer replicas or micro-batches" if replicas > 1 else "fewer micro-batches (--micro-batches)"
        each = plural(m, "micro-batch", "micro-batches")
        option.error = PlanError(
            f"{stages} x {replicas} (stages x replicas) with {each} each needs a mini-batch of at least "
            f"{m * replicas} rows: use a larger batch (--batch-size) or {fewer}"
        )
        return option
    try:
        check_micro_batches(config.method, stages, m)
    except ValueError as exc:
        option.reason = f"2bw needs M >= N ({m} < {stages})"
        option.fix = "use at least as many micro-batches as stages (--micro-batches, micro_batches=)"
        option.error = PlanError(str(exc))
        return option
    cores = layout_cores(config.cores, stages * replicas)
    layout = replace(config, num_stages=stages, micro_batches=m, data_parallel=replicas, cores=cores)
    try:
        costs = scale_rows(graph, factor) if isinstance(graph, CostGraph) else graph(int(rows))
        made = plan(costs, layout)
        if replicas > 1 and made.shared:  # compile refuses them: never chosen, also by partition
            raise PlanError("tied weights read by several stages cannot be replicated yet")
        option.plan = made
    except InfeasibleMemoryError as exc:
        need = exc.min_feasible_bytes
        option.reason = f"over the memory limit: needs {format_bytes(need)} ({need} bytes) per device"
        option.min_feasible_bytes = exc.min_feasible_bytes
        option.error = exc
    except PlanError as exc:
        option.reason = str(exc).split(";")[0]
        option.error = exc
    return option


def _raise_infeasible(gpus: int, config: CostConfig, options: list[LayoutOption], forced: str = "") -> None:
    """Raise the error for no feasible layout: the layout's own where only one was asked for;
    else, where memory rules layouts out, one naming the smallest per-device limit any layout
    fits in, and that layout. ``forced`` (e.g. ``"--stages 1"``): the options forced by the
    caller, named in the error with the advice to drop them (other layouts were not tried).

    Raises:
        InfeasibleMemoryError: some layout fits under a larger memory limit.
        PlanError: no layout fits whatever the memory limit.
    """
    others = f", or drop {forced} to let the planner try the other layouts" if forced else ""
    if len(options) == 1 and options[0].error is not None:
        error = options[0].error
        if others and isinstance(error, InfeasibleMemoryError):  # another layout may fit
            raise InfeasibleMemoryError(f"{error}{others}", error.limit_bytes, error.min_feasible_bytes)
        raise error
    reasons = "; ".join(f"{o.stages}x{o.replicas}: {o.reason}" for o in options[:4])
    if len(options) > 4:
        reasons += f"; {len(options) - 4} more"
    limit = f" in {format_bytes(config.memory_limit)} per device" if config.memory_limit is not None else ""
    which = f"no layout of {gpus} devices{f' with {forced}' if forced else ''} is feasible{limit} ({reasons})"
    sized = [o for o in options if o.min_feasible_bytes is not None]
    if not sized:
        # the memory limit rules none out here: raising it would not help
        fixes = list(dict.fromkeys(o.fix for o in options if o.fix))
        advice = " or ".join(fixes) if fixes else "raise --gpus or force another layout (--stages)"
        raise PlanError(f"{which}: {advice}{others}")
    least = min(sized, key=lambda o: (o.min_feasible_bytes, o.devices))
    need = int(least.min_feasible_bytes or 0)
    raise InfeasibleMemoryError(
        f"{which}; the smallest feasible limit is {format_bytes(need)} ({need} bytes) with "
        f"{least.stages} x {least.replicas} (stages x replicas): raise the limit (memory= in compile, "
        "--memory on the command line) to at least that"
        f"{others}",
        limit_bytes=config.memory_limit or 0,
        min_feasible_bytes=need,
    )


def choose_layout(
    graph: CostGraph | Profiler,
    config: CostConfig,
    gpus: int,
    *,
    stages: int | None = None,
    replicas: int | None = None,
    micro_batches: int | None = None,
    plan: Callable[[CostGraph, CostConfig], Plan] = make_plan,
    mini_batch: int | None = None,
) -> LayoutChoice:
    """Plan every layout of ``gpus`` devices (or the forced ones) and choose the fastest.

    Args:
        graph: the cost graph, profiled on one micro-batch of the G-stage pipeline, scaled to
            each layout's rows; or a :data:`Profiler` giving each layout's own (module docstring).
        config: method, bandwidths, latency, action overhead, memory limit, optimizer costs, and
            the cores the ranks share (``cores``: the machine's, where fewer than ``gpus``;
            stages, micro-batches, replicas and cores are replaced per layout).
        gpus: G, devices available.
        stages, replicas: force N, or R, or both (:func:`candidates`).
        micro_batches: M for every layout (default: N for GPipe, 1F1B and 2BW, else 1).
        plan: the partitioner (``make_plan`` with the caller's solver options).
        mini_batch: rows of one mini-batch (needed with a profiler).

    Raises:
        InfeasibleMemoryError: no layout fits the memory limit (the error names the smallest
            limit that one does, and that layout).
        PlanError: no layout is feasible (the reasons are listed), or a forced layout needs
            more than ``gpus`` devices.
    """
    layouts = candidates(gpus, stages, replicas)
    options = [plan_layout(graph, config, gpus, n, r, micro_batches, plan, mini_batch) for n, r in layouts]
    feasible = [o for o in options if o.plan is not None]
    if not feasible:
        given = (("stages", stages), ("data-parallel", replicas))
        _raise_infeasible(gpus, config, options, " ".join(f"--{k} {v}" for k, v in given if v is not None))
    order = sorted(feasible, key=lambda o: (-o.throughput_per_s, o.devices, o.replicas))
    rest = [o for o in options if o.plan is None]
    chosen = order[0]
    assert chosen.plan is not None
    choice = LayoutChoice(chosen, order + rest)
    chosen.plan.summary["layouts"] = choice.to_dict()
    return choice
