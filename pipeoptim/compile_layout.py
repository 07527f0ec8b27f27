"""``compile(..., data_parallel="auto")``: the layout of ``gpus`` devices chosen by the planner.

Every layout of N stages × R replicas with ``N·R ≤ gpus`` is planned from a profile of its own
micro-batch (``ceil(B / (R·M))`` rows of the example mini-batch of B rows, the micro-batch
``compile`` plans that layout from) with the cost model ``compile`` uses (bandwidth, latency,
action overhead, optimizer-update costs, the CPU cores the ranks share), and the fastest is
chosen (:func:`pipeoptim.compiler.layouts.choose_layout`). ``compile`` then builds the chosen
layout as if it had been asked for it: profiles and update costs come from ``profile_dir``, so
its plan is the one chosen and predicts the same throughput (with ``profile_dir=None`` both are
measured again, and may differ by the timing noise).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeoptim import microbatch
from pipeoptim.compiler import profile_model
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.layouts import LayoutChoice, choose_layout
from pipeoptim.compiler.optimizer_state import optimizer_state_factor
from pipeoptim.compiler.plan import Plan, make_plan
from pipeoptim.errors import PlanError
from pipeoptim.given_plan import read_plan
from pipeoptim.inputs import example_tuple
from pipeoptim.loss_cost import loss_pricing
from pipeoptim.methods import METHODS, get_method
from pipeoptim.runtime import spmd
from pipeoptim.runtime.affinity import ranks_bound
from pipeoptim.runtime.clipping import check_clipping
from pipeoptim.runtime.linkcost import shared_cores, stage_threads
from pipeoptim.runtime.precision import autocast_context, check_autocast
from pipeoptim.runtime.prediction import check_pipeoptim_options
from pipeoptim.runtime.replicas import check_replicated_options
from pipeoptim.units import parse_bandwidth, parse_bytes, plural
from pipeoptim.update_pricing import UpdatePricing, passes_over_gradients

if TYPE_CHECKING:
    from pipeoptim.pipeline import Pipeline


def choose_compile_layout(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    config: CostConfig,
    gpus: int,
    micro_batches: int | None,
    *,
    stages: int | None = None,
    replicas: int | None = None,
    leaf_modules: Sequence[str] = (),
    profile_dir: str | None = "profiles",
    device: torch.device | str = "cpu",
    solver: str = "auto",
    autocast: torch.dtype | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    runnable: Callable[[int, int], None] = lambda _stages, _replicas: None,
    pricing: Callable[[CostConfig], CostConfig] = lambda config: config,
    priced: Callable[[nn.Module, Sequence[torch.Tensor], CostGraph], CostGraph] | None = None,
) -> LayoutChoice:
    """The fastest predicted layout of ``gpus`` devices for ``model`` on the mini-batch ``inputs``.

    Args:
        model: the model (not changed).
        inputs: one mini-batch of inputs, ``[B, ...]`` each.
        config: ``compile``'s cost model for ``gpus`` stages; ``cores`` are the CPU cores the
            ranks share where fewer than ``gpus`` (:func:`pipeoptim.runtime.linkcost.shared_cores`).
        gpus: G, devices available.
        micro_batches: M of every layout (``None``: N for gpipe, 1f1b and 2bw, else 1).
        stages, replicas: force N, or R, or both.
        leaf_modules, profile_dir, device, solver, autocast, log: as ``compile``'s.
        runnable: ``runnable(N, R)`` raises ``ValueError`` for a layout ``compile`` refuses
            with the other options (then it is infeasible, for that reason).
        pricing: each layout's update costs (:class:`pipeoptim.update_pricing.UpdatePricing`:
            timed beside that layout's other ranks); by default ``config``'s.
        priced: each profile with the loss priced (:class:`pipeoptim.loss_cost.LossPricing`).

    Raises:
        InfeasibleMemoryError, PlanError: no layout is feasible, or a forced one needs more
            than ``gpus`` devices (from ``choose_layout``).
        TraceError, ProfileError: from profiling.
    """
    batch = int(inputs[0].shape[0])

    def profile(rows: int) -> CostGraph:
        micro = tuple(x[:rows].detach().cpu() for x in inputs)
        with microbatch.profiled_rows(inputs[0], micro[0]), autocast_context(autocast, device):
            graph, _ = profile_model(
                model, micro, leaf_modules=leaf_modules, profile_dir=profile_dir, device=device, log=log
            )
            return graph if priced is None else priced(model, micro, graph)

    def plan(graph: CostGraph, layout: CostConfig) -> Plan:
        try:
            runnable(layout.num_stages, layout.data_parallel)
        except ValueError as exc:
            raise PlanError(str(exc)) from exc
        return make_plan(graph, pricing(layout), solver=solver)

    return choose_layout(
        profile,
        config,
        gpus,
        stages=stages,
        replicas=replicas,
        micro_batches=micro_batches,
        plan=plan,
        mini_batch=batch,
    )


def stage_device(kind: str, input_device: torch.device) -> torch.device:
    """Where the stages will run (and are profiled) under executor ``kind``: the inputs' device
    (``"local"``), else the first GPU or the CPU."""
    if kind == "local":
        return input_device
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def layout_compiler(
    compile_fn: Callable[..., Pipeline], stages: int | str | None, replicas: int | str
) -> Callable[..., Pipeline]:
    """``compile_fn`` (``pipeoptim.compile``) for ``stages`` N and ``replicas`` R as
    ``pipeoptim train`` takes them: ``compile_fn`` itself for an R and no N (N = gpus / R),
    else :func:`compile_best_layout` searching what is ``"auto"`` (R; N also where ``None``)."""
    if stages is None and replicas != "auto":
        return compile_fn
    return partial(
        compile_best_layout,
        compile_fn,
        stages=None if stages == "auto" else stages,
        replicas=None if replicas == "auto" else replicas,
    )


def layout_record(plan: Plan) -> dict[str, Any]:
    """The layout a plan is for, and every layout considered where the planner chose it
    (``stages``, ``data_parallel``, ``options``), for ``metrics.json``."""
    layout = {"stages": plan.num_stages, "data_parallel": plan.config.data_parallel}
    return {**layout, **plan.summary.get("layouts", {})}


def compile_best_layout(
    compile_fn: Callable[..., Pipeline],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    gpus: int = 4,
    *,
    stages: int | None = None,
    replicas: int | None = None,
    **options: Any,
) -> Pipeline:
    """``compile_fn(model, optimizer, gpus, **options)`` (``pipeoptim.compile``) in the fastest
    predicted layout
    of N stages × R replicas with ``N·R ≤ gpus`` (``stages`` / ``replicas`` force N, R or both;
    :func:`plan_best_layout`); ``pipe.plan.summary["layouts"]`` lists every layout considered.
    ``options`` are ``compile``'s keyword arguments (``data_parallel`` is ignored: it is chosen).

    Raises:
        ValueError: a bad argument, or the torchrun executor (its world size fixes the ranks).
        InfeasibleMemoryError, PlanError: no layout is feasible; and what ``compile`` raises.
    """
    options.pop("data_parallel", None)
    _refuse_torchrun(options)
    _check_gpus(gpus)  # a plan's layout too (helper-158: gpus='4' raised a raw TypeError)
    if options.get("plan") is not None:  # the plan fixes the layout (it was refused as R=1 before)
        plan = options["plan"] = given_layout(options["plan"], gpus, stages, replicas)
        n, r = plan.num_stages, plan.config.data_parallel
        return compile_fn(model, optimizer, n * r, **options, data_parallel=r)
    choice = plan_best_layout(model, optimizer, gpus, stages=stages, replicas=replicas, **options)
    n, r = choice.chosen.stages, choice.chosen.replicas
    pipe = compile_fn(model, optimizer, n * r, **options, data_parallel=r)
    pipe.plan.summary["layouts"] = choice.to_dict()
    return pipe


def _check_gpus(gpus: object) -> None:
    """Raises ValueError: ``gpus`` is not a positive integer."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer (devices), got {gpus!r}")


def _refuse_torchrun(options: dict[str, Any]) -> None:
    """Refuse ``data_parallel="auto"`` under torchrun, whose world size fixes the ranks.

    Raises:
        ValueError: the executor is torchrun's.
    """
    kind = options.get("executor", "auto")
    if kind == "torchrun" or (kind == "auto" and spmd.under_torchrun()):
        raise ValueError(
            "data_parallel='auto' cannot run under torchrun (the world size fixes the ranks): choose the "
            "layout with `pipeoptim partition MODEL --gpus G` and pass data_parallel=R"
        )


def given_layout(
    plan: Plan | str | os.PathLike[str], gpus: int, stages: int | None, replicas: int | None
) -> Plan:
    """The plan handed to ``compile(..., data_parallel="auto", plan=...)``, read, whose N stages
    × R replicas are the layout, checked against ``gpus`` and a forced N or R.

    Raises:
        PlanError: unreadable, or for more than ``gpus`` devices or another forced N or R.
    """
    chosen = plan if isinstance(plan, Plan) else read_plan(plan)
    n, r = chosen.num_stages, chosen.config.data_parallel
    for what, forced, have in (("stages", stages, n), ("replicas", replicas, r)):
        if forced is not None and forced != have:
            raise PlanError(
                f"the plan is for {plural(n, 'stage')} x {plural(r, 'replica')}, not {forced} {what}; "
                f"give a plan made for {forced} {what}, or leave the {what} to the plan"
            )
    if n * r > gpus:
        raise PlanError(
            f"the plan is for {plural(n, 'stage')} x {plural(r, 'replica')} ({n * r} devices), more "
            f"than the {gpus} given (gpus, --gpus): give {n * r} or more, or a plan for fewer devices"
        )
    return chosen


def plan_best_layout(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    gpus: int = 4,
    *,
    stages: int | None = None,
    replicas: int | None = None,
    **options: Any,
) -> LayoutChoice:
    """Every layout of N stages × R replicas with ``N·R ≤ gpus`` (``stages`` / ``replicas``
    force N, R or both), planned as ``pipeoptim.compile(model, optimizer, N·R, **options,
    data_parallel=R)`` would plan it, best first (module docstring). ``options`` are
    ``compile``'s keyword arguments (``data_parallel`` is ignored).

    Raises:
        ValueError: a bad argument, or the torchrun executor (its world size fixes the ranks).
        PredictorError: an optimizer the method cannot predict or step (SpecTrain without SGD
            momentum), before any layout is planned.
        InfeasibleMemoryError, PlanError: no layout is feasible, or a forced one needs more
            than ``gpus`` devices.
    """
    _refuse_torchrun(options)
    kind = options.get("executor", "auto")
    _check_gpus(gpus)
    method = options.get("method", "pipeoptim")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    # an optimizer no layout can use, refused before every layout is profiled and planned, as
    # compile refuses it (its warnings are compile's to give, once)
    predictor, backward = options.get("predictor", "paper"), options.get("backward", "current")
    check_pipeoptim_options(method, get_method(method).policy, predictor, backward, optimizer, warn=False)
    inputs = example_tuple(options.get("example_inputs"))
    device = stage_device(kind, inputs[0].device)
    say = options.get("log") or (lambda _msg: None)
    profile_dir = options.get("profile_dir", "profiles")
    with stage_threads("processes" if kind == "auto" else kind, device):  # timed as the stages run
        clipping = passes_over_gradients(options.get("max_grad_norm"), options.get("autocast"))
        pricing = UpdatePricing.of(optimizer, device, profile_dir, say, clipping)
        config = planning_config(
            optimizer,
            method,
            gpus,
            device,
            pricing,
            bandwidth=options.get("bandwidth", "25GB/s"),
            memory=options.get("memory"),
            latency=options.get("latency", 0.0),
            action_overhead=options.get("action_overhead", 0.0),
            allreduce_bandwidth=options.get("allreduce_bandwidth"),
            allreduce_latency=options.get("allreduce_latency"),
        )
        choice = choose_compile_layout(
            copy.deepcopy(model).cpu(),
            inputs,
            config,
            gpus,
            options.get("micro_batches"),
            stages=stages,
            replicas=replicas,
            leaf_modules=options.get("leaf_modules", ()),
            profile_dir=profile_dir,
            device=device,
            solver=options.get("solver", "auto"),
            autocast=options.get("autocast"),
            log=say,
            runnable=partial(_runnable, options),
            pricing=pricing,
            priced=loss_pricing(
                options["loss_fn"],
                options.get("loss_reduction", "mean"),
                options.get("example_targets"),
                int(inputs[0].shape[0]),
                device,
                profile_dir,
                say,
            ),
        )
    n, r = choice.chosen.stages, choice.chosen.replicas
    say(f"layout {n} x {r} (stages x replicas) chosen of {gpus} devices:\n{choice.table()}")
    return choice


def planning_config(
    optimizer: torch.optim.Optimizer,
    method: str,
    devices: int,
    device: torch.device,
    pricing: Callable[[CostConfig], CostConfig],
    bandwidth: str | float | None,
    memory: str | int | None,
    latency: float,
    action_overhead: float,
    allreduce_bandwidth: str | float | None = None,
    allreduce_latency: float | None = None,
    **layout: Any,
) -> CostConfig:
    """The cost model's settings for planning on ``devices`` devices, the same for ``compile``
    and its layout search: the optimizer's measured step, prediction and weight-copy cost per
    byte of the layout's ranks (``pricing``, timed on a working set like the optimizer's
    parameters beside the other ranks on this CPU; ``0`` with a logged reason where it cannot
    be measured), its state factor, bandwidth, latency (seconds per message), the replicas'
    all-reduce bandwidth and fixed cost (``None``: the link's), memory limit, action overhead
    (seconds), the CPU cores the ranks share, recomputation where the memory limit binds;
    ``layout`` gives ``num_stages``, ``micro_batches`` and ``data_parallel`` (default:
    ``devices`` stages).

    Raises:
        ValueError: a bandwidth or memory string that does not parse.
    """
    config = CostConfig(
        num_stages=layout.pop("num_stages", devices),
        method=method,
        bandwidth=parse_bandwidth(bandwidth) if bandwidth is not None else None,
        allreduce_bandwidth=parse_bandwidth(allreduce_bandwidth) if allreduce_bandwidth is not None else None,
        allreduce_latency_s=allreduce_latency,
        memory_limit=parse_bytes(memory) if memory is not None else None,
        opt_state_factor=optimizer_state_factor(optimizer),
        latency_s=latency,
        action_overhead_s=action_overhead,
        cores=shared_cores(devices) if device.type == "cpu" else None,
        cores_pinned=ranks_bound(),
        recompute=True,  # stages recompute where the memory limit binds
        **layout,
    )
    return pricing(config)


def _runnable(options: dict[str, Any], stages: int, replicas: int) -> None:
    """Refuse, as ``compile`` would with these ``options``, N stages × R replicas.

    Raises:
        ValueError: an option replicas do not support yet (clipping or float16 with an
            asynchronous method, deferred batch norm) when ``replicas > 1``.
    """
    asynchronous = get_method(options.get("method", "pipeoptim")).asynchronous
    clip, autocast = check_clipping(options.get("max_grad_norm")), check_autocast(options.get("autocast"))
    batch_norm = options.get("batch_norm", "micro-batch")
    check_replicated_options(replicas, clip, batch_norm, autocast, asynchronous)
