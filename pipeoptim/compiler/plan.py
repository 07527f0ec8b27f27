"""The pipeline plan: which node runs in which stage, what crosses each boundary, what it costs.

A :class:`Plan` is plain data (JSON, schema :data:`PLAN_SCHEMA`); with the traced model it is
all :mod:`pipeoptim.compiler.codegen` needs to emit the stage submodules.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from pipeoptim.compiler import baselines
from pipeoptim.compiler import partition as partitioners
from pipeoptim.compiler.assignment import PartitionResult
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig, StageStats, evaluate
from pipeoptim.compiler.held_memory import fit_held_copies
from pipeoptim.compiler.shared import shared_parameters
from pipeoptim.compiler.summary import summarize
from pipeoptim.errors import PlanError
from pipeoptim.fileio import write_json, wrong_fields
from pipeoptim.units import column_bytes, format_bytes, format_seconds, plural

PLAN_SCHEMA = "pipeoptim-plan/1"
#: what every plan file holds beside its schema (:meth:`Plan.to_dict`)
_FIELDS = {"stages": list, "io": list, "config": dict, "stage_of": dict, "summary": dict, "values": dict}
_FIELDS |= {"profile_key": dict, "shared": dict}


@dataclass
class StageIO:
    """The interface of one stage.

    Attributes:
        inputs: names of the values the stage receives, in order (stage 0: the model inputs;
            stage k > 0: what stage k-1 sends).
        outputs: names of the values it sends to stage k+1, in order (the last stage: the
            values of the model's output).
    """

    inputs: list[str]
    outputs: list[str]


@dataclass
class Plan:
    """A partition of a model's graph into pipeline stages.

    Attributes:
        model: model name.
        config: what the plan is for (stages, method, bandwidth, memory limit).
        stage_of: stage index of every graph node, by node name.
        stages: per-stage costs (:class:`~pipeoptim.compiler.costmodel.StageStats`).
        summary: bottleneck, lower bound, balance, throughput, bubble (see
            :func:`~pipeoptim.compiler.summary.summarize`) plus how the plan was solved.
        io: per-stage interface.
        values: metadata of every value that crosses a boundary: ``{"meta": [...],
            "container": ...}`` as in :class:`~pipeoptim.compiler.costgraph.CostNode`.
        batch_size: micro-batch size the plan was made for.
        profile_key: key of the profile the plan was made from (graph hash, inputs, device,
            torch version).
        shared: shared parameters, ``{get_attr node name: stages holding a copy}``
            (:mod:`pipeoptim.compiler.shared`): never sent between stages.
    """

    model: str
    config: CostConfig
    stage_of: dict[str, int]
    stages: list[StageStats]
    summary: dict[str, Any]
    io: list[StageIO]
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 1
    profile_key: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def recompute(self) -> list[bool]:
        """Per stage, whether it recomputes its activations (planned recomputation,
        :mod:`pipeoptim.compiler.costmodel`); plans saved before it existed recompute none."""
        return [s.recompute for s in self.stages]

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """One row per stage plus the summary, as text (tabulate); a stage's time columns add up
        to its ``stage ms`` (with an ``allreduce ms`` column where the pipeline has replicas, and
        a ``recompute`` column, the forward run again, under a memory limit or where a stage
        recomputes)."""
        replicated = self.config.data_parallel > 1
        recomputing = self.config.memory_limit is not None or any(self.recompute)
        params, sent, memory = (
            column_bytes([getattr(s, f) for s in self.stages])
            for f in ("param_bytes", "send_bytes", "memory_bytes")
        )
        rows = [
            [
                str(s.index),
                f"{s.first_node} .. {s.last_node}",
                str(s.num_nodes),
                params[k],
                f"{s.fwd_s * 1e3:.3f}",
                f"{s.bwd_s * 1e3:.3f}",
                f"{s.update_s * 1e3:.3f}",
                f"{s.comm_s * 1e3:.3f}",
                f"{s.overhead_s * 1e3:.3f}",
                *([f"{s.allreduce_s * 1e3:.3f}"] if replicated else []),
                *([f"yes, +{s.recompute_s * 1e3:.3f} ms" if s.recompute else "no"] if recomputing else []),
                sent[k],
                memory[k],
                f"{s.time_s * 1e3:.3f}",
            ]
            for k, s in enumerate(self.stages)
        ]
        headers = ["stage", "nodes", "#", "params", "fwd ms", "bwd ms", "update ms", "comm ms", "overhead ms"]
        headers += [*(["allreduce ms"] if replicated else []), *(["recompute"] if recomputing else [])]
        headers += ["sent", "memory", "stage ms"]
        align = ["left" if h in ("nodes", "recompute") else "right" for h in headers]
        sm = self.summary
        shared = (
            [f"shared cores    {self.config.cores:g} run all stages: they set the throughput"]
            if sm.get("cores_bound")
            else []
        )
        # "ilp" is the optimal partitioner, whichever of its solvers (the DP over ideals, the
        # ILP's HiGHS or CBC) found the plan: the solver follows in brackets
        solved = "optimal partitioner" if sm["partitioner"] == "ilp" else f"{sm['partitioner']}"
        if sm.get("solver"):
            gap = "" if sm.get("gap") in (None, 0.0) else f", gap {sm['gap']:.2%}"
            units = "" if "units" in str(sm["status"]) else f", {plural(sm['num_units'], 'unit')}"
            solved += f" ({sm['solver']}, {sm['status']}{gap}{units})"
        lines = [
            # the numbers as formatted above (tabulate would re-read "0.120" as 0.12)
            tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True, colalign=align),
            "",
            f"bottleneck      {format_seconds(sm['bottleneck_s'])} (stage {sm['bottleneck_stage']})",
            f"lower bound     {format_seconds(sm['lower_bound_s'])} = max(total / N, largest node) "
            "+ every stage's overhead and latency",
            f"balance ratio   {sm['balance_ratio']:.3f} (bottleneck / lower bound)",
            f"throughput      {sm['throughput_per_s']:.2f} mini-batches/s predicted (steady state, "
            f"method {self.config.method})",
            f"bubble          {sm['bubble_fraction']:.1%} of device time idle",
            *shared,
            f"loss            {_loss_line(sm.get('loss'), self.num_stages)}",
            f"solved by       {solved} in {sm['solve_s']:.2f} s",
        ]
        if self.shared:
            held = "; ".join(f"{node} by stages {', '.join(map(str, h))}" for node, h in self.shared.items())
            sums = ", ".join(
                f"{format_bytes(s.shared_bytes)} at stage {s.index}" for s in self.stages if s.shared_bytes
            )
            lines.append(f"shared          held {held}; gradient sums {sums or 'none'} each way per step")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "model": self.model,
            "config": asdict(self.config),
            "batch_size": self.batch_size,
            "profile_key": self.profile_key,
            "summary": self.summary,
            "stages": [s.to_dict() for s in self.stages],
            "io": [asdict(x) for x in self.io],
            "values": self.values,
            "stage_of": self.stage_of,
            "shared": self.shared,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON, atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>") -> Plan:
        """Rebuild a plan from :meth:`to_dict` output.

        Raises:
            PlanError: another schema or missing fields.
        """
        if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise PlanError(f"{origin}: plan schema {found!r} is not {PLAN_SCHEMA!r}; make the plan again")
        wrong = wrong_fields(data, _FIELDS)
        if wrong:  # null or a string where an object is (a hand edit) failed deep inside compile
            raise PlanError(
                f"{origin}: malformed plan ({', '.join(wrong)} missing or of the wrong type); "
                "make the plan again"
            )
        try:
            stages = []
            for s in data["stages"]:
                fields = {k: v for k, v in s.items() if k != "compute_s"}
                stages.append(StageStats(**fields))
            return cls(
                model=data["model"],
                config=CostConfig(**data["config"]),
                stage_of={k: int(v) for k, v in data["stage_of"].items()},
                stages=stages,
                summary=data["summary"],
                io=[StageIO(**x) for x in data["io"]],
                values=data["values"],
                batch_size=int(data.get("batch_size", 1)),
                profile_key=data["profile_key"],
                shared={k: [int(s) for s in v] for k, v in data["shared"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"{origin}: malformed plan ({exc}); make the plan again") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan file.

        Raises:
            PlanError: missing, truncated, not JSON or another schema.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan {path} is not valid JSON ({exc.msg}); make the plan again") from exc
        except UnicodeDecodeError as exc:  # a checkpoint or another binary file given as the plan
            raise PlanError(f"{path} is not a plan file (not text); give a plan saved by --save") from exc
        return cls.from_dict(data, str(path))


def _loss_line(loss: dict[str, float] | None, stages: int) -> str:
    """The plan table's line on the loss function's time (:mod:`pipeoptim.loss_cost`)."""
    if not loss:
        return "not in the plan (made without example targets: the last stage is priced without it)"
    return (
        f"fwd {loss['fwd_s'] * 1e3:.3f} + bwd {loss['bwd_s'] * 1e3:.3f} ms per micro-batch, in stage "
        f"{stages - 1}'s columns"
    )


def stage_io(graph: CostGraph, stage_of: list[int], num_stages: int) -> list[StageIO]:
    """The values each stage receives and sends.

    A value produced at stage i and read at stage j > i is in the outputs of stages
    i..j-1 and the inputs of stages i+1..j (passed on by the stages between). Shared
    parameters (:func:`pipeoptim.compiler.shared.shared_parameters`) are held, not sent.
    """
    users = graph.users()
    shared = shared_parameters(graph, stage_of)
    boundary: list[list[str]] = [[] for _ in range(num_stages - 1)]
    for p, readers in enumerate(users):
        if not readers or p in shared:
            continue
        last = max(stage_of[r] for r in readers)
        for b in range(stage_of[p], last):
            boundary[b].append(graph.nodes[p].name)
    inputs0 = [n.name for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    io = []
    for k in range(num_stages):
        ins = inputs0 if k == 0 else boundary[k - 1]
        outs = list(output.inputs) if k == num_stages - 1 else boundary[k]
        io.append(StageIO(inputs=list(ins), outputs=outs))
    return io


def make_plan(
    graph: CostGraph,
    config: CostConfig,
    *,
    partitioner: str = "ilp",
    solver: str = "auto",
    time_limit: float = 30.0,
    max_units: int = 64,
    ideals: bool = True,
) -> Plan:
    """Partition ``graph`` for ``config`` and describe the result as a :class:`Plan`.

    Args:
        partitioner: ``"ilp"`` (default), ``"chain_dp"``, or a baseline from
            :data:`pipeoptim.compiler.baselines.BASELINES`.
        solver, time_limit, max_units, ideals: passed to :func:`pipeoptim.compiler.partition.ilp`.

    Raises:
        PlanError: bad stage count or partitioner.
        InfeasibleMemoryError: the memory limit cannot be met, a copy of each shared
            parameter counted at every stage holding it (:mod:`pipeoptim.compiler.held_memory`).
    """
    if partitioner not in ("ilp", "chain_dp", *baselines.BASELINES):
        names = ", ".join(["ilp", "chain_dp", *baselines.BASELINES])
        raise PlanError(f"unknown partitioner {partitioner!r}; choose one of {names}")

    def solve(graph: CostGraph, config: CostConfig) -> PartitionResult:
        if partitioner == "ilp":
            return partitioners.ilp(
                graph, config, solver=solver, time_limit=time_limit, max_units=max_units, ideals=ideals
            )
        if partitioner == "chain_dp":
            result = baselines.chain_dp(graph, config)
            assert result is not None
            return result
        return baselines.BASELINES[partitioner](graph, config)

    return plan_from_assignment(graph, config, fit_held_copies(graph, config, solve))


def plan_from_assignment(graph: CostGraph, config: CostConfig, result: PartitionResult) -> Plan:
    """The :class:`Plan` of an assignment of nodes to stages (``result.stage_of``, in the
    order of ``graph.nodes``), with its costs evaluated under ``config``.

    Raises:
        ValueError: the assignment sends an edge backwards or names a stage out of range.
    """
    recompute = "limit" if result.recompute is None else result.recompute
    stats = evaluate(graph, result.stage_of, config, recompute)
    summary = summarize(graph, stats, config)
    summary.update(
        partitioner=result.partitioner,
        solver=result.solver,
        status=result.status,
        optimal=result.optimal,
        gap=result.gap,
        solve_s=result.solve_s,
        num_units=result.num_units,
        # the graph ran at shorter sequence lengths when profiled: a plan given back to
        # compile keeps serving them (it refused them before, helper-156)
        dynamic_length=bool(graph.info.get("dynamic_length")),
    )
    io = stage_io(graph, result.stage_of, config.num_stages)
    crossing = {name for x in io for name in x.inputs + x.outputs}
    values = {
        n.name: {"meta": n.out_meta, "container": n.out_container} for n in graph.nodes if n.name in crossing
    }
    return Plan(
        model=graph.model,
        config=config,
        stage_of={n.name: s for n, s in zip(graph.nodes, result.stage_of)},
        stages=stats,
        summary=summary,
        io=io,
        values=values,
        batch_size=graph.batch_size,
        profile_key=graph.key,
        shared={graph.nodes[i].name: h for i, h in shared_parameters(graph, result.stage_of).items()},
    )
