"""``pipeoptim partition``: print and save a pipeline plan."""

from __future__ import annotations

import json
from collections.abc import Callable

import click
import torch
from click.core import ParameterSource

from pipeoptim.cli.loading import ModelSpecError, load_model
from pipeoptim.cli.options import (
    BYTES,
    DTYPE,
    GPUS,
    LAYOUT_WIDTH,
    SHAPE,
    FiniteFloatRange,
    json_alone,
    link_figures,
    link_options,
    torch_device,
)
from pipeoptim.cli.profiles import Profiles, factory_loss
from pipeoptim.cli.train_checks import check_forced_layout, check_micro_batches_apply
from pipeoptim.compiler.baselines import BASELINES
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.layouts import Profiler, choose_layout, default_micro_batches, scale_rows
from pipeoptim.compiler.optimizer_state import optimizer_state_factor
from pipeoptim.compiler.plan import make_plan
from pipeoptim.compiler.plot import plot_plan
from pipeoptim.compiler.profile_key import device_name
from pipeoptim.errors import PipeoptimError
from pipeoptim.fileio import cache_folder
from pipeoptim.methods import METHODS
from pipeoptim.runtime.affinity import ranks_bound
from pipeoptim.runtime.linkcost import shared_cores, stage_threads
from pipeoptim.units import plural
from pipeoptim.update_cost import working_set, working_set_of
from pipeoptim.update_pricing import UpdatePricing


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("partition")
@click.argument("model", required=False)
@GPUS
@click.option(
    "--input-shape",
    type=SHAPE,
    multiple=True,
    help="Example input shape, batch first (e.g. 8x3x32x32); repeat for several inputs.",
)
@click.option(
    "--input-dtype",
    type=DTYPE,
    multiple=True,
    help="dtype of the example input(s), e.g. int64 for token ids; without --input-shape, the "
    "factory's example inputs are cast to it.",
)
@click.option(
    "--memory", type=BYTES, default=None, help="Per-stage memory limit, e.g. 16GiB, 16GB or 1.5e10 (bytes)."
)
@link_options(measured=False)
@click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    default="pipeoptim",
    show_default=True,
    help="Pipeline method; decides weight copies and activations in flight.",
)
@click.option(
    "--micro-batches",
    type=click.IntRange(min=1),
    default=None,
    help="Micro-batches per replica's share of a mini-batch for gpipe, 1f1b and 2bw (default: the "
    "stages, as in train).",
)
@click.option(
    "--optimizer",
    default="momentum",
    show_default=True,
    help="Optimizer whose state is counted and whose step is timed: "
    "sgd, momentum, adam, adamw, rmsprop, adagrad, adadelta, adamax, nadam, radam.",
)
@click.option(
    "--partitioner",
    type=click.Choice(["ilp", "chain_dp", *BASELINES]),
    default="ilp",
    show_default=True,
    help="ILP, exact contiguous DP, or a baseline.",
)
@click.option(
    "--solver",
    type=click.Choice(["auto", "cbc", "highs"]),
    default="auto",
    show_default=True,
    help="ILP solver; auto is HiGHS where highspy is installed, else CBC.",
)
@click.option(
    "--exact-dp/--no-exact-dp",
    default=True,
    show_default=True,
    help="Solve by the exact dynamic program over the graph's ideals where it has few enough "
    "(at most 1,500 on some level of coarsening), else by the ILP; --no-exact-dp: the ILP only.",
)
@click.option(
    "--time-limit",
    type=FiniteFloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds the ILP solver may use.",
)
@click.option(
    "--profile",
    "profile_file",
    type=click.Path(dir_okay=False),
    help="Plan from this profile or cost-graph JSON instead of profiling MODEL.",
)
@click.option(
    "--data-parallel",
    "data_parallel",
    type=LAYOUT_WIDTH,
    default=None,
    help="Force R replicas of the pipeline (the stages are chosen unless --stages is given too); "
    "default or 'auto': choose R.",
)
@click.option(
    "--stages",
    type=click.IntRange(min=1),
    default=None,
    help="Force N pipeline stages (the replicas are chosen unless --data-parallel is given too).",
)
@click.option(
    "--loss-reduction",
    type=click.Choice(["mean", "sum"]),
    default="mean",
    show_default=True,
    help="How the factory's loss_fn reduces over rows (compile's loss_reduction), checked as the "
    "loss is timed; refused where no loss is priced.",
)
@click.option("--profile-dir", default="profiles", show_default=True, help="Where profiles are cached.")
@click.option("--leaf", multiple=True, help="Qualified name of a module to keep as one node.")
@click.option("--device", default=None, help="Device to profile on (default: cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--save", type=click.Path(dir_okay=False), help="Write the plan JSON to this file.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Draw the plan into this PNG: per-stage time and memory, and where the cuts fall.",
)
@json_alone
def partition(
    model,
    gpus,
    input_shape,
    input_dtype,
    memory,
    bandwidth,
    latency,
    action_overhead,
    method,
    micro_batches,
    optimizer,
    partitioner,
    solver,
    exact_dp,
    time_limit,
    profile_file,
    data_parallel,
    stages,
    loss_reduction,
    profile_dir,
    leaf,
    device,
    as_json,
    save,
    plot,
    stdout,
) -> None:
    """Plan MODEL on --gpus devices: every layout of N stages x R replicas with N*R <= --gpus
    is planned and the fastest predicted is chosen; the runner-ups are listed, then the chosen
    plan's stages. --stages and --data-parallel force N or R (both: exactly that layout).

    MODEL is a built-in example (mlp, resnet, transformer, multi_io, long_skip, gpt2),
    module:factory or path/file.py:factory; the factory returns a model or
    (model, example_inputs), one micro-batch of the --gpus-stage pipeline, or
    (model, example_inputs, example_targets, loss_fn), whose loss the plans then price on
    the last stage (timed as compile times it). Each layout is
    planned from a profile of its own micro-batch (the example's rows times --gpus
    micro-batches, split over its replicas and micro-batches); with --profile (then MODEL may
    be left out) from that profile, its costs scaled to the layout's rows.
    """
    try:
        opt_factor = optimizer_state_factor(optimizer)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--optimizer") from exc
    if model is None and profile_file is None:
        raise click.UsageError("give a MODEL, or --profile FILE to plan from a saved profile")
    check_forced_layout(gpus, stages, data_parallel)  # usage errors, before any profiling
    reduction_given = (
        click.get_current_context().get_parameter_source("loss_reduction") is not ParameterSource.DEFAULT
    )
    if reduction_given and profile_file is not None:
        raise click.UsageError(
            "--loss-reduction reduces the loss a MODEL factory returns, and a plan from --profile "
            "leaves the loss out: drop --loss-reduction, or plan from MODEL without --profile"
        )
    check_micro_batches_apply(method, micro_batches)
    target = torch_device(device)
    if profile_dir is not None:
        try:
            cache_folder(profile_dir, "--profile-dir", _log)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    # timed as `pipeoptim train`'s stage processes run (one thread each on the CPU)
    on = target or torch.device("cpu")
    with stage_threads("processes", on):
        try:
            if profile_file is not None:
                graph: CostGraph | Profiler = CostGraph.load(profile_file)
                assert isinstance(graph, CostGraph)
                if model is not None:
                    _check_profile_matches(model, graph, input_shape, input_dtype, leaf, device)
                mini_batch, profiled = None, None
                on_this_cpu = graph.key.get("device") == device_name(torch.device("cpu"))
            else:
                loaded = load_model(model, input_shape, input_dtype)
                if reduction_given and (loaded.loss_fn is None or loaded.targets is None):
                    raise click.UsageError(
                        f"--loss-reduction {loss_reduction}: {model} gives no example targets or no "
                        "loss_fn (no built-in example does), so there is no loss to reduce: drop "
                        "--loss-reduction, or use a factory returning (model, example_inputs, "
                        "example_targets, loss_fn)"
                    )
                net, examples = loaded.model, loaded.inputs
                m = micro_batches or default_micro_batches(method, gpus)
                mini_batch = int(examples[0].shape[0]) * m
                loss = factory_loss(loaded, loss_reduction, mini_batch, on, profile_dir, _log)
                profiled = Profiles(net, examples, leaf, profile_dir, target, _log, loss)
                graph = profiled.profile
                on_this_cpu = target is None or target.type == "cpu"
            given = graph if isinstance(graph, CostGraph) else None
            if given is not None:  # one graph node per parameter tensor
                params = sum(1 for n in given.nodes if n.param_bytes)
                elements = working_set(given.total_param_bytes, params, on)
            else:
                elements = working_set_of(net.parameters(), on)
            pricing, note = _update_pricing(optimizer, device, given, profile_dir, elements)
            figures = link_figures(
                bandwidth,
                latency,
                action_overhead,
                lambda msg: click.echo(msg, err=True),
                None if on_this_cpu else "the stages are planned for another device than this machine's CPU",
            )
            config = CostConfig(
                num_stages=gpus,
                method=method,
                bandwidth=figures.bandwidth,
                allreduce_bandwidth=figures.allreduce_bandwidth,
                allreduce_latency_s=figures.allreduce_latency,
                memory_limit=memory,
                opt_state_factor=opt_factor,
                recompute=True,  # stages recompute where --memory binds
                cores=shared_cores(gpus) if on_this_cpu else None,
                cores_pinned=ranks_bound(),
                latency_s=figures.latency,
                action_overhead_s=figures.action_overhead,
            )
            choice = choose_layout(
                graph,
                config,
                gpus,
                stages=stages,
                replicas=None if data_parallel in (None, "auto") else data_parallel,
                micro_batches=micro_batches,
                plan=lambda g, c: make_plan(
                    g,
                    pricing(c),
                    partitioner=partitioner,
                    solver=solver,
                    time_limit=time_limit,
                    ideals=exact_dp,
                ),
                mini_batch=mini_batch,
            )
        except (PipeoptimError, ModelSpecError, ImportError) as exc:
            raise click.ClickException(str(exc)) from exc
    plan = choice.chosen.plan
    assert plan is not None
    if isinstance(graph, CostGraph):
        planned, reused = scale_rows(graph, choice.chosen.rows_factor), True
    else:
        assert profiled is not None
        planned, reused = profiled.profile(int(choice.chosen.rows)), profiled.reused
    if note:
        _log(note)
    if save:
        try:
            plan.save(save)
        except OSError as exc:
            raise click.ClickException(f"cannot write the plan {save}: {exc.strerror or exc}") from exc
        _log(f"saved plan {save}")
    if plot:
        try:
            plot_plan(plan, plot, planned)
        except OSError as exc:
            raise click.ClickException(f"cannot write the plot {plot}: {exc.strerror or exc}") from exc
        _log(f"drew plan {plot}")
    if as_json:
        data = plan.to_dict()
        out = {
            **plan.summary,
            "model": plan.model,
            "num_stages": plan.num_stages,
            "data_parallel": plan.config.data_parallel,
            "num_nodes": len(planned.nodes),
            "profile_reused": reused,
            "config": data["config"],
            "stages": data["stages"],
            "io": data["io"],
        }
        json.dump(out, stdout, indent=1, default=str)
        stdout.write("\n")
        return
    nodes = plural(len(planned.nodes), "node")
    click.echo(f"{plan.model}: {nodes}, {plural(gpus, 'device')}, method {method}")
    click.echo(choice.table())
    click.echo("")
    click.echo(
        f"chosen layout   {plural(plan.num_stages, 'stage')} x "
        f"{plural(plan.config.data_parallel, 'replica')} "
        f"({plan.num_stages * plan.config.data_parallel} of {plural(gpus, 'device')}), "
        f"{plan.summary['throughput_per_s']:.2f} mini-batches/s predicted"
    )
    click.echo("")
    click.echo(plan.table())


_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "momentum": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "adamax": (torch.optim.Adamax, {}),
    "nadam": (torch.optim.NAdam, {}),
    "radam": (torch.optim.RAdam, {}),
}


def _update_pricing(
    optimizer: str,
    device: str | None,
    graph: CostGraph | None,
    profile_dir: str | None,
    elements: tuple[int, int],
) -> tuple[Callable[[CostConfig], CostConfig], str]:
    """Each layout's optimizer-step, prediction and weight-copy seconds per parameter byte,
    measured on this machine on ``elements`` (a working set like the model's,
    :func:`working_set`) beside the layout's other ranks on this CPU
    (:class:`~pipeoptim.update_pricing.UpdatePricing`), and a note for the user ("" if none).

    A saved profile (``graph``) from another device has no such measurement: updates are
    then left out, and the note says so.
    """
    target = torch_device(device) or torch.device("cpu")
    if graph is not None:
        key = graph.key
        if key.get("device") != device_name(target):
            measured_on = key.get("device") or "another device"
            note = f"optimizer updates not modelled: the profile was measured on {measured_on}"
            return lambda config: config, note
    cls, defaults = _OPTIMIZERS[optimizer.lower()]
    return UpdatePricing(cls, defaults, target, elements, profile_dir, _log), ""


def _check_profile_matches(model, graph, input_shape, input_dtype, leaf, device) -> None:
    from pipeoptim.compiler.profile_key import profile_key
    from pipeoptim.compiler.trace import trace

    loaded = load_model(model, input_shape, input_dtype)
    net, examples = loaded.model, loaded.inputs
    if loaded.loss_fn is not None:  # the saved profile's rows are scaled, not the loss's (helper-178)
        _log("with --profile the plan leaves the factory's loss out: drop --profile to price it")
    traced = trace(net, examples, leaf)
    key = profile_key(traced, examples, torch_device(device) or examples[0].device)
    if graph.key != key:
        diff = [k for k in key if graph.key.get(k) != key[k]]
        raise click.ClickException(
            f"--profile was made for another setting than {model} ({', '.join(diff)} differ); "
            "drop --profile to profile the model again"
        )
