"""``pipeoptim.compile``: a model and its optimizer become a pipeline-parallel trainer.

Checks the request, traces, profiles and partitions the model (:mod:`pipeoptim.compiler`),
and hands the resulting :class:`~pipeoptim.runtime.build.PipelineSpec` to a
:class:`~pipeoptim.pipeline.Pipeline`, which starts the runtime.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeoptim import microbatch
from pipeoptim.batchnorm import BATCH_NORMS, defer_batch_norm
from pipeoptim.compile_checks import check_options
from pipeoptim.compile_layout import compile_best_layout, planning_config
from pipeoptim.compile_layout import stage_device as _profile_device
from pipeoptim.compiler import plan_model
from pipeoptim.compiler.hooks import compiled_modules_warning, dropped_hooks_warning
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.shapes import plan_dynamic_length, plan_length
from pipeoptim.compiler.trace import trace
from pipeoptim.errors import PipelineError, PlanError, first_line
from pipeoptim.given_plan import given_plan
from pipeoptim.inputs import check_traced_rows, example_tuple
from pipeoptim.loss_cost import loss_pricing
from pipeoptim.methods import METHODS, check_micro_batch_count, check_micro_batches, get_method
from pipeoptim.pipeline import Pipeline
from pipeoptim.random_state import keeps_random_state
from pipeoptim.runtime import spmd
from pipeoptim.runtime.affinity import binding_asked
from pipeoptim.runtime.build import PipelineSpec
from pipeoptim.runtime.clipping import check_clipping
from pipeoptim.runtime.compiled import check_compile_stages
from pipeoptim.runtime.grad_modes import training_modes
from pipeoptim.runtime.launch import check_executor
from pipeoptim.runtime.linkcost import stage_threads
from pipeoptim.runtime.optim import constructor_arguments, hyperparameters, param_group_names
from pipeoptim.runtime.policies import policy_options
from pipeoptim.runtime.precision import autocast_context, check_autocast
from pipeoptim.runtime.prediction import check_pipeoptim_options
from pipeoptim.runtime.rank_settings import check_same_on_every_rank, compile_settings, same_graph, together
from pipeoptim.runtime.replicas import check_layout, check_replicated_options
from pipeoptim.runtime.spawning import check_devices, check_not_importing_main
from pipeoptim.runtime.stage_state import held_state
from pipeoptim.update_pricing import UpdatePricing, passes_over_gradients


@keeps_random_state
@training_modes()  # profiled as the stages train, whatever the caller's grad, inference or autocast mode
def compile(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    gpus: int = 4,
    *,
    example_inputs: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    loss_reduction: microbatch.Reduction = "mean",
    example_targets: Any = None,
    batch_norm: str = "micro-batch",
    method: str = "pipeoptim",
    micro_batches: int | None = None,
    memory: str | int | None = None,
    bandwidth: str | float | None = "25GB/s",
    latency: float = 0.0,
    action_overhead: float = 0.0,
    allreduce_bandwidth: str | float | None = None,
    allreduce_latency: float | None = None,
    profile_dir: str | os.PathLike[str] | None = "profiles",
    plan: Plan | str | os.PathLike[str] | None = None,
    executor: str = "auto",
    leaf_modules: Sequence[str] = (),
    seed: int = 0,
    timeout: float = 300.0,
    backward: str = "current",
    predictor: str = "paper",
    nan_check: str = "stages",
    solver: str = "auto",
    log: Callable[[str], None] | None = None,
    max_grad_norm: float | None = None,
    autocast: torch.dtype | None = None,
    compile_stages: bool | str = False,
    prediction_error_every: int = 64,
    data_parallel: int | str = 1,
) -> Pipeline:
    """Compile ``model`` and ``optimizer`` into a pipeline of ``gpus`` stages (or of
    ``gpus / data_parallel`` stages, replicated ``data_parallel`` times; or, with
    ``data_parallel="auto"``, in the layout the planner predicts fastest).

    Args:
        model: any ``nn.Module``; it is copied, never changed.
        optimizer: a ``torch.optim`` optimizer over ``model``'s parameters; each stage runs
            one of the same class with the same per-group hyperparameters (a learning-rate
            scheduler on it keeps working).
        gpus: devices (worker processes, torchrun ranks): N stages × R replicas. With
            ``data_parallel=1`` (default) it is the number of pipeline stages N.
        example_inputs: one mini-batch of inputs (tensor or tuple), ``[batch, ...]``; the
            plan is made for this batch size (split into micro-batches where the method
            does). Dim 0 is the batch dimension.
        loss_fn: ``loss_fn(model_output, targets) -> scalar tensor`` over the rows it gets.
        loss_reduction: ``"mean"`` (default): ``loss_fn`` is the mean over its rows;
            ``"sum"``: the sum; a function ``count(targets)``: the mean over the units it counts
            (the non-padding tokens of a cross-entropy with ``ignore_index``). Micro-batch
            losses are weighted to give the loss and gradient of the whole mini-batch
            (:mod:`pipeoptim.microbatch`); every micro-batch calls ``loss_fn`` twice more, on
            two parts of it, after its backward, and one that shows it is not what
            ``loss_reduction`` says fails that step.
        example_targets: the targets of ``example_inputs``' mini-batch, as ``step`` gets them:
            the plan then prices ``loss_fn``'s forward (with that check) and backward on the
            last stage (:mod:`pipeoptim.loss_cost`); ``None``: the plan leaves the loss out.
        batch_norm: ``"micro-batch"`` (default): each micro-batch updates the BatchNorm
            running statistics, as gradient accumulation does; ``"deferred"`` (gpipe and
            1f1b): once per mini-batch, from all its rows (:mod:`pipeoptim.batchnorm`).
        method: ``pipeoptim`` (default), ``pipedream``, ``2bw``, ``spectrain``, ``none``,
            ``gpipe`` or ``1f1b`` (see :mod:`pipeoptim.methods`).
        micro_batches: M for gpipe, 1f1b and 2bw (default N; 2bw needs M >= N).
        memory: per-stage memory limit (``"16GiB"``, bytes) for the plan; where it binds, the
            planner lets stages recompute their activations (planned recomputation,
            :mod:`pipeoptim.compiler.costmodel`), and those stages do.
        bandwidth: between stages (``"25GB/s"``, bytes/s); ``None`` ignores communication.
        latency: seconds per message between stages (α of α + β·bytes, e.g. measured with
            :func:`pipeoptim.runtime.linkcost.measure_link`); 0 leaves it out of the plan.
        action_overhead: the runtime's seconds per action (forward, backward, step) for the
            plan's predicted stage times; 0 leaves it out. On the CPU the plan also counts the
            cores the worker processes share (:func:`pipeoptim.runtime.linkcost.shared_cores`).
            :func:`pipeoptim.machine_costs.load_or_measure_machine_costs` gives ``bandwidth``,
            ``latency``, ``action_overhead`` and the all-reduce's figures for CPU worker processes
            on this machine (measured once and cached; ``pipeoptim train`` uses them by default).
        allreduce_bandwidth, allreduce_latency: bytes/s and seconds per all-reduce (its fixed
            cost, once per gradient bucket and step) of the replicas' ring all-reduce
            (:func:`pipeoptim.runtime.linkcost.measure_allreduce`); ``None``: the link's.
        profile_dir: where profiles are cached (``None``: do not cache).
        plan: a :class:`~pipeoptim.compiler.plan.Plan` or plan file (``pipeoptim partition
            --save``) to use instead of planning; it must be for this model's graph, ``gpus``
            stages and ``method`` (with ``data_parallel="auto"``: its N stages × R replicas are
            the layout, ``N·R ≤ gpus``).
        executor: ``"local"`` (all stages in this process, deterministic), ``"processes"``
            (one worker process per stage, torch.distributed), ``"torchrun"`` (this process is
            one rank of a torchrun job and runs its stage), or ``"auto"`` (``torchrun`` when
            started by torchrun, else ``processes``).
        leaf_modules: qualified names of modules to keep as single nodes. Hooks registered
            on a module run in training (once per micro-batch, as in the plain model) only if
            it stays a module: a leaf, or inside one; hooks that tracing drops are named in a
            ``UserWarning`` (see :mod:`pipeoptim.compiler.hooks`).
        seed: seed of the per-stage, per-micro-batch random streams (dropout): the masks
            depend on which stage a random layer lands in, so an exact repeat needs the plan
            too (``plan=``).
        timeout: seconds any wait between stages may take before the pipeline fails.
        backward: PipeOptim only: ``"current"`` weights (the paper) or ``"predicted"``.
        predictor: PipeOptim only: ``"paper"`` (ΔW from the optimizer's state, the paper's
            formula) or ``"next-step"`` (Adam/AdamW, RMSprop, Adagrad: the last gradient is
            folded into the moments first; the real next step when the gradient repeats).
        nan_check: ``"stages"`` (default: every stage checks its outputs, and a NaN there or
            a NaN/inf loss stops training naming the mini-batch and the stage where it
            appeared), ``"loss"`` (only the loss), ``"off"``.
        solver: ILP solver where the plan needs one, ``auto`` (HiGHS where installed, as the command
            line), ``cbc`` or ``highs``.
        log: receives progress messages (profiling, reuse of a saved profile).
        max_grad_norm: clip each mini-batch's gradients by their global norm over all
            stages, as ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` over the
            parameters ``optimizer`` updates, before ``optimizer.step()``: with gpipe and 1f1b
            equal to plain training; the asynchronous methods clip without a stall by the norm
            of :mod:`pipeoptim.runtime.async_norms` (exact at stage 0; with one replica,
            and no weights shared between stages). ``None``: no clipping.
        autocast: ``torch.bfloat16`` or ``torch.float16`` (every method; float16 with
            loss scaling over all stages as ``torch.amp.GradScaler``,
            :mod:`pipeoptim.runtime.scaler`): every stage computes its forward and the loss under
            ``torch.autocast`` (as the plain model inside that context), values cross stage
            boundaries in the dtypes autocast gives them, and the plan is made from a profile
            under autocast (:mod:`pipeoptim.runtime.precision`). A caller's own ``with
            torch.autocast(...)`` does not reach worker processes: use this option.
        compile_stages: ``True``: every stage's forward (and so its backward) runs through
            ``torch.compile`` with inductor; a backend name (``"aot_eager"``) picks another
            (:mod:`pipeoptim.runtime.compiled`). ``False`` (default): eager stages.
        prediction_error_every: every stage measures ``‖W_fwd − W_bwd‖ / ‖W_bwd‖`` for one
            micro-batch in this many (default 64), keeping a copy of its weights per sampled
            micro-batch in flight, two where the forward uses a prediction, none where the
            policy keeps them anyway (:meth:`Pipeline.stats`, :mod:`pipeoptim.runtime.staleness`);
            0: off. A sample of the benchmark MLP's first stage of 2 (8 MiB) took 5.7 ms with
            PipeOptim and 1.7 ms with weight stashing: at 1 in 16 PipeOptim's was 3% of the
            stage's time, at 1 in 64 under 1%.
        data_parallel: R, replicas of the pipeline (data parallelism; ``gpus`` must be a
            multiple): each mini-batch is split into R shares of M micro-batches, one per
            replica, and each stage's replicas sum their gradients before every step, so GPipe
            and 1F1B equal plain training on the whole mini-batch and the replicas stay
            bit-identical under every method (:mod:`pipeoptim.runtime.replicas`). Rank
            ``replica·N + stage`` runs ``stage`` of ``replica``. The default, 1, keeps
            ``gpus`` meaning N stages. ``"auto"``: every layout of N stages × R replicas with
            ``N·R ≤ gpus`` is planned, each from a profile of its own micro-batch, and the
            fastest predicted is built (:mod:`pipeoptim.compile_layout`; the pipeline then
            has ``N·R`` ranks, possibly fewer than ``gpus``); ``pipe.plan.summary["layouts"]``
            lists every layout considered with its predicted throughput. Not with
            ``executor="torchrun"``, whose world size fixes the ranks.

    Raises:
        ValueError: a bad argument (the message says which and what is allowed).
        PredictorError: ``method="pipeoptim"`` with an optimizer that has no predictor, or
            ``spectrain`` without SGD momentum.
        TraceError, ProfileError, PlanError: from the compiler.
        PipelineError: more stages than GPUs on a CUDA machine, or a wrong torchrun world size.
    """
    arguments = dict(locals())  # as given: under torchrun the ranks compare them before anything
    leaf_modules = arguments["leaf_modules"] = check_options(leaf_modules, timeout, solver)  # read once
    torchrun = executor != "local" and spmd.under_torchrun()
    if torchrun:  # so that they refuse, plan and build alike
        spmd.check_world(gpus)  # before joining: too few or many ranks never join
        spmd.join(timeout)
        check_same_on_every_rank(compile_settings(arguments))
    # a refusal on one rank alone (a file it cannot write, a model it cannot copy) on every rank
    with together("check its compile arguments", "torchrun" if torchrun else "local"):
        if data_parallel == "auto":
            options = {k: v for k, v in arguments.items() if k not in ("model", "optimizer", "gpus")}
            return compile_best_layout(compile, model, optimizer, gpus, **options)
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
            raise ValueError(f"gpus must be a positive integer (the number of stages), got {gpus!r}")
        if type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            raise ValueError(
                "the model is wrapped by torch.compile, which cannot be traced into stages: pass "
                "model._orig_mod, and compile_stages=True to compile each stage instead"
            )
        devices, gpus = gpus, check_layout(gpus, data_parallel)  # from here on gpus is N, the stages
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        check_executor(executor)
        if nan_check not in ("stages", "loss", "off"):
            raise ValueError(f"nan_check must be 'stages', 'loss' or 'off', not {nan_check!r}")
        microbatch.check_reduction(loss_fn, loss_reduction)
        if batch_norm not in BATCH_NORMS:
            raise ValueError(f"batch_norm must be 'micro-batch' or 'deferred', not {batch_norm!r}")
        info = get_method(method)
        max_grad_norm = check_clipping(max_grad_norm)
        autocast = check_autocast(autocast, model)
        check_replicated_options(data_parallel, max_grad_norm, batch_norm, autocast, info.asynchronous)
        if not isinstance(prediction_error_every, int) or prediction_error_every < 0:
            raise ValueError(
                "prediction_error_every must be 0 (off) or a positive integer, got "
                f"{prediction_error_every!r}"
            )
        m = micro_batches if micro_batches is not None else (gpus if info.micro_batched else 1)
        m = check_micro_batch_count(method, m)
        check_micro_batches(method, gpus, m)
        check_pipeoptim_options(method, info.policy, predictor, backward, optimizer)
        kind = executor
        if kind == "auto":
            kind = "torchrun" if spmd.under_torchrun() else "processes"
        if kind != "local":
            binding_asked()  # a PIPEOPTIM_CPU_AFFINITY neither on nor off: before any work
        if kind == "processes":
            check_not_importing_main()  # before profiling: this process is a worker starting
            check_devices(devices)
        inputs = example_tuple(example_inputs)
        profiled_on = _profile_device(kind, inputs[0].device)  # where the stages run and are timed
        backend = check_compile_stages(compile_stages, profiled_on)
        batch = int(inputs[0].shape[0])
        if batch < m * data_parallel:
            raise ValueError(
                f"example batch of {batch} rows cannot be split into {m * data_parallel} micro-batches"
            )
        micro = tuple(x[: math.ceil(batch / (m * data_parallel))].detach().cpu() for x in inputs)
        try:
            model_copy = copy.deepcopy(model).cpu()
        except (NotImplementedError, RuntimeError, TypeError) as exc:  # torch's CSR tensors, locks, files
            raise ValueError(
                f"the model cannot be copied with copy.deepcopy ({type(exc).__name__}: "
                f"{first_line(exc)}), which compile needs: keep sparse tensors in COO layout (.to_sparse(); "
                ".to_sparse_csr() inside forward), nn.utils.parametrizations.weight_norm for the old "
                "nn.utils.weight_norm, and remove attributes that cannot be copied (open files, locks)"
            ) from exc
        if batch_norm == "deferred":
            if method not in ("gpipe", "1f1b"):
                raise ValueError(
                    f"batch_norm='deferred' needs a method that flushes each mini-batch (gpipe, 1f1b), not "
                    f"{method!r}; the asynchronous methods run a mini-batch as one micro-batch (2bw aside), "
                    "where BatchNorm already tracks the whole mini-batch"
                )
            if not defer_batch_norm(model_copy):
                raise ValueError(
                    f"batch_norm='deferred' but {type(model).__name__} has no BatchNorm1d/2d/3d that tracks "
                    "running statistics: leave batch_norm unset"
                )
        groups = param_group_names(optimizer, model)
        say = log or (lambda _msg: None)
        rank0 = kind != "torchrun" or dist.get_rank() == 0
        # timed where a plan is priced: not on the ranks that take rank 0's (they raced to save theirs)
        clipping = passes_over_gradients(max_grad_norm, autocast)
        pricing = (
            UpdatePricing.of(optimizer, profiled_on, profile_dir, say, clipping) if rank0 or plan else None
        )
        with stage_threads(kind, profiled_on):  # timed as the stages run
            config = planning_config(
                optimizer,
                method,
                devices,
                profiled_on,
                pricing or (lambda config: config),
                bandwidth=bandwidth,
                memory=memory,
                latency=latency,
                action_overhead=action_overhead,
                allreduce_bandwidth=allreduce_bandwidth,
                allreduce_latency=allreduce_latency,
                num_stages=gpus,
                micro_batches=m,
                data_parallel=data_parallel,
            )
    if plan is not None:
        with together("trace its model for the plan given", kind):  # each rank checks it
            traced = trace(model_copy, micro, leaf_modules)
            chosen = given_plan(plan, traced, config, say, micro, autocast)
        static_batch, dynamic_length = traced.method == "export", plan_dynamic_length(chosen)
    elif rank0:
        try:
            with (
                stage_threads(kind, profiled_on),
                autocast_context(autocast, profiled_on),
                microbatch.profiled_rows(inputs[0], micro[0]),  # a profile's error names the rows
            ):
                planned = plan_model(
                    model_copy,
                    micro,
                    config,
                    leaf_modules=leaf_modules,
                    profile_dir=profile_dir,
                    device=profiled_on,
                    solver=solver,
                    log=say,
                    priced=loss_pricing(
                        loss_fn, loss_reduction, example_targets, batch, profiled_on, profile_dir, say
                    ),
                )
        except Exception as exc:
            if kind == "torchrun":  # the other ranks wait for the plan: they stop too
                spmd.broadcast(("failed", f"{type(exc).__name__}: {exc}"))
            raise
        chosen, traced = planned.plan, planned.traced
        static_batch = bool(planned.graph.info.get("static_batch"))
        dynamic_length = bool(planned.graph.info.get("dynamic_length"))
    if kind == "torchrun" and plan is None:  # rank 0 planned; every rank uses its plan
        shared = spmd.broadcast((chosen.to_dict(), static_batch, dynamic_length) if rank0 else None)
        if shared[0] == "failed":
            raise PipelineError(f"rank 0 could not plan the model, so no rank compiles it: {shared[1]}")
        chosen, static_batch, dynamic_length = Plan.from_dict(shared[0]), shared[1], shared[2]
        with together("trace its model into rank 0's graph", kind):
            traced = traced if rank0 else same_graph(trace(model_copy, micro, leaf_modules), chosen)
    for dropped in (dropped_hooks_warning(model_copy, traced), compiled_modules_warning(model_copy)):
        if dropped is not None:
            warnings.warn(dropped, stacklevel=2)
    if batch_norm == "deferred" and traced.method == "export":
        raise PlanError(
            f"batch_norm='deferred' needs a model torch.fx can trace; {type(model).__name__} was traced "
            "with torch.export, which inlines BatchNorm: use batch_norm='micro-batch'"
        )
    if static_batch and batch % (m * data_parallel):
        raise PlanError(
            f"{type(model).__name__} was traced with torch.export, which fixed the batch size: the "
            f"example batch ({batch}) must be a multiple of micro_batches × data_parallel "
            f"({m * data_parallel})"
        )
    check_traced_rows(traced.batch_rows, {"mini-batch": batch, "micro-batch": int(micro[0].shape[0])})
    spec = PipelineSpec(
        model=model_copy,
        example_inputs=micro,
        leaf_modules=tuple(leaf_modules),
        plan=chosen,
        method=method,
        optimizer_class=type(optimizer),
        optimizer_defaults=constructor_arguments(optimizer),
        group_names=groups,
        hyper=hyperparameters(optimizer),
        loss_fn=loss_fn,
        loss_reduction=loss_reduction,
        micro_batches=m,
        seed=seed,
        policy_options=policy_options(info.policy, backward, predictor, m),
        nan_check=nan_check,
        length=plan_length(chosen, micro, dynamic_length and not static_batch),
        max_grad_norm=max_grad_norm,
        autocast=autocast,
        compile_stages=backend,
        prediction_error_every=prediction_error_every,
        data_parallel=data_parallel,
    )
    device = inputs[0].device if kind == "local" else torch.device("cpu")
    pipe = Pipeline(spec, traced, optimizer, batch, static_batch, kind, device, timeout)
    held = held_state(model, optimizer)  # an optimizer that has stepped: continue from its state
    if held is not None:  # under torchrun rank 0's, as its weights are every rank's
        pipe._continue_from(spmd.broadcast(held) if kind == "torchrun" else held)
    return pipe
