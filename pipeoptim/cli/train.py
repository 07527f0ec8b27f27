"""``pipeoptim train``: train a built-in task with a pipeline method."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from pipeoptim.cli.options import BYTES, GPUS, LAYOUT_WIDTH, FiniteFloatRange, link_figures, link_options
from pipeoptim.cli.train_checks import check_layout_options, check_rows
from pipeoptim.errors import PipeoptimError, first_line
from pipeoptim.methods import METHODS
from pipeoptim.optimizers import OPTIMIZERS
from pipeoptim.records import summary_line
from pipeoptim.resume import checkpoint_path, inherit_settings
from pipeoptim.tasks import TASKS
from pipeoptim.training import SEQUENTIAL, TrainConfig, train


@click.command("train")
@click.argument("task", type=click.Choice(list(TASKS)))
@GPUS
@click.option(
    "--method",
    type=click.Choice([*METHODS, SEQUENTIAL]),
    default="pipeoptim",
    show_default=True,
    help="Pipeline method, or 'sequential' for plain training without a pipeline.",
)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default="sgd",
    show_default=True,
    help="sgd and rmsprop use --momentum; adam, adamw and adagrad their usual defaults.",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Passes over the data."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Mini-batch size."
)
@click.option(
    "--lr",
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    help="Peak learning rate (default: 0.02 for sgd, 0.01 for adagrad, 0.001 for the others).",
)
@click.option(
    "--lr-schedule",
    type=click.Choice(["cosine", "constant"]),
    default="cosine",
    show_default=True,
    help="Cosine annealing to 0 over the run (a scheduler on the optimizer), or constant.",
)
@click.option(
    "--momentum",
    type=FiniteFloatRange(min=0, max=1),
    default=0.9,
    show_default=True,
    help="Momentum of sgd and rmsprop.",
)
@click.option(
    "--weight-decay",
    type=FiniteFloatRange(min=0),
    default=None,
    help="Weight decay; default: the optimizer's own (adamw 0.01, the others 0).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the model, the data and dropout.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with the task's files (fashion-mnist IDX, SST-2 TSV, Multi30K).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Use only this many training examples."
)
@click.option(
    "--test-limit",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluate on only this many test examples (BLEU decoding is slow).",
)
@click.option(
    "--micro-batches",
    type=click.IntRange(min=1),
    default=None,
    help="Micro-batches per replica's share of a mini-batch for gpipe, 1f1b and 2bw (default: the stages).",
)
@click.option(
    "--data-parallel",
    type=LAYOUT_WIDTH,
    default=None,
    help="Force R replicas of the pipeline (each stage's replicas all-reduce their gradients before "
    "every step); default or 'auto': chosen with the stages (N x R <= --gpus) by the planner.",
)
@click.option(
    "--stages",
    type=click.IntRange(min=1),
    default=None,
    help="Force N pipeline stages; default: chosen with the replicas by the planner. With "
    "--data-parallel too: exactly that layout.",
)
@click.option(
    "--executor",
    type=click.Choice(["processes", "local"]),
    default="processes",
    show_default=True,
    help="'processes': one worker per stage (torch.distributed); 'local': deterministic, one process.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder for metrics.json, train.csv, curves.png and checkpoint.pt (with --resume: "
    "by default the checkpoint's folder).",
)
@click.option("--plot", is_flag=True, help="Write curves.png with the loss and metric curves.")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=None,
    help="Write a checkpoint every K mini-batches and after every epoch.",
)
@click.option(
    "--resume",
    type=click.Path(),
    default=None,
    help="Continue the run in this folder from its checkpoint, with its settings where not given anew.",
)
@click.option(
    "--profile-dir",
    default="profiles",
    show_default=True,
    help="Where profiles and optimizer costs are cached (reused while model, shapes, device, torch "
    "version and threads match).",
)
@click.option(
    "--nan-check",
    type=click.Choice(["stages", "loss", "off"]),
    default="stages",
    show_default=True,
    help="Stop at a NaN in any stage's activations or a NaN/inf loss, only at the loss, or never.",
)
@click.option(
    "--max-grad-norm",
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    help="Clip each mini-batch's gradients by their global norm over all stages: exact for gpipe, "
    "1f1b, sequential and one stage; the asynchronous methods use the newest norms that reach each "
    "stage without waiting (exact at stage 0; README, Training features).",
)
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="bfloat16/float16: every stage computes under torch.autocast (activations cross stages in "
    "16 bits); float16 scales the loss as torch.amp.GradScaler (asynchronous methods: a stage skips "
    "a mini-batch that overflowed there or in a later stage).",
)
@click.option(
    "--memory",
    type=BYTES,
    default=None,
    help="Per-stage memory limit of the plan, e.g. 16GiB (bytes); where it binds, stages recompute "
    "their activations (the plan table shows which).",
)
@link_options(measured=True)
@click.option(
    "--plan",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Train on this plan (its N stages x R replicas and the cut between stages) instead of "
    "planning: a run folder's plan.json, or one saved by `pipeoptim partition --save` or "
    "pipe.plan.save; made for this task's model, --method and --micro-batches. A resumed run "
    "trains on its checkpoint's plan.",
)
@click.option(
    "--compile-stages",
    is_flag=True,
    help="Run every stage through torch.compile (inductor; on the CPU it needs a C++ compiler).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds any wait between stages may take before the run fails (a stage stopped or "
    "stuck: every worker is then ended, and the run's records and last checkpoint kept).",
)
@click.option(
    "--record-every",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Append train.csv rows every K mini-batches (a killed run keeps rows up to its last K).",
)
@click.option(
    "--progress-every",
    type=click.IntRange(min=1),
    default=None,
    help="Without a terminal: a progress line every N mini-batches (default: a tenth of an epoch).",
)
@click.option("--quiet", is_flag=True, help="No progress bar or progress lines.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the run's metrics (metrics.json) on stdout at the end."
)
def train_command(
    task,
    gpus,
    method,
    optimizer,
    epochs,
    batch_size,
    lr,
    lr_schedule,
    momentum,
    weight_decay,
    seed,
    data_dir,
    limit,
    test_limit,
    micro_batches,
    data_parallel,
    stages,
    executor,
    out,
    plot,
    checkpoint_every,
    resume,
    profile_dir,
    nan_check,
    max_grad_norm,
    precision,
    compile_stages,
    memory,
    bandwidth,
    latency,
    action_overhead,
    plan,
    timeout,
    record_every,
    progress_every,
    quiet,
    as_json,
) -> None:
    """Train TASK (digits, fashion-mnist, sst2, multi30k) and evaluate it after every epoch, on
    --gpus devices as the N stages x R replicas the planner predicts fastest (--stages and
    --data-parallel force N, R or both)."""
    context = click.get_current_context()
    if out is None:  # a resumed run goes on in its own folder
        if resume is None:
            raise click.UsageError("Missing option '--out': the run folder (optional only with --resume)")
        out = str(checkpoint_path(resume).parent)
    links = [
        "--" + name.replace("_", "-")
        for name in ("bandwidth", "latency", "action_overhead")
        if context.get_parameter_source(name) is not ParameterSource.DEFAULT
    ]
    if plan is not None and resume is not None:
        raise click.UsageError("--resume trains on the run's own plan (its checkpoint's): leave --plan out")
    check_layout_options(
        method, micro_batches, data_parallel, stages, [*links, *["--plan"] * bool(plan)], gpus
    )
    if context.get_parameter_source("momentum") is not ParameterSource.DEFAULT and optimizer not in (
        "sgd",
        "rmsprop",
    ):
        raise click.UsageError(
            f"--momentum applies to sgd and rmsprop, not --optimizer {optimizer} (whose update "
            "has no momentum option): leave --momentum out or choose --optimizer sgd or rmsprop"
        )
    check_rows(batch_size, micro_batches, data_parallel)
    if lr is None:
        lr = {"sgd": 0.02, "adagrad": 0.01}.get(optimizer, 1e-3)

    def measured(config: TrainConfig) -> TrainConfig:
        """The config with this machine's figures for each ``measure`` (train() calls it once
        the run folder, the checkpoint and the data have been checked; an earlier run's
        checkpoint stays until this run's records replace its own)."""
        if earlier:  # said once the folder is this run's (a run using it refuses this one)
            click.echo(earlier, err=True)
        try:
            figures = link_figures(
                bandwidth,
                latency,
                action_overhead,
                lambda msg: click.echo(msg, err=True),
                _not_measurable(config.executor, config.method),
            )
        except KeyboardInterrupt:
            click.echo(
                "interrupted while measuring this machine's link and runtime costs: nothing was saved",
                err=True,
            )
            sys.exit(130)
        return replace(config, **figures._asdict())

    config = TrainConfig(
        task=task,
        out=out,
        gpus=gpus,
        method=method,
        optimizer=optimizer,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
        data_dir=data_dir,
        limit=limit,
        test_limit=test_limit,
        micro_batches=micro_batches,
        data_parallel="auto" if data_parallel in (None, "auto") else data_parallel,
        stages="auto" if stages is None and data_parallel not in (None, "auto") else stages,
        executor=executor,
        checkpoint_every=checkpoint_every,
        resume=resume,
        plot=plot,
        progress=not quiet,
        record_every=record_every,
        progress_every=progress_every,
        profile_dir=profile_dir,
        nan_check=nan_check,
        max_grad_norm=max_grad_norm,
        precision=precision,
        compile_stages=compile_stages,
        memory=memory,
        plan=None if plan is None else str(Path(plan).resolve()),  # a record that holds elsewhere
        timeout=timeout,
    )
    found = [name for name in ("metrics.json", "checkpoint.pt") if (Path(out) / name).exists()]
    earlier = ""
    if found and (resume is None or checkpoint_path(resume).parent.resolve() != Path(out).resolve()):
        instead = (
            f"--resume {out} to continue from its checkpoint, or "
            if "checkpoint.pt" in found and resume is None
            else ""
        )
        earlier = (
            f"{out} holds an earlier run ({', '.join(found)}): this run replaces it once it starts "
            f"training; pass {instead}another --out to keep it"
        )
    given = {
        name for name in context.params if context.get_parameter_source(name) is not ParameterSource.DEFAULT
    }
    try:
        config = inherit_settings(config, given)  # a resumed run's other settings are its own
        metrics = train(config, log=lambda msg: click.echo(msg, err=True), costs=measured)
    except (PipeoptimError, ValueError, OSError) as exc:  # OSError: a disk full, a file made read-only
        raise click.ClickException(first_line(exc) or type(exc).__name__) from exc
    except KeyboardInterrupt:
        click.echo("interrupted: no stage is left running; the last checkpoint (if any) is intact", err=True)
        sys.exit(130)
    click.echo(json.dumps(metrics, indent=1) if as_json else summary_line(metrics))


def _not_measurable(executor: str, method: str) -> str | None:
    """Why this machine's measured CPU link and runtime figures do not price the run's stages
    (None where they do: worker processes on the CPU)."""
    if method == SEQUENTIAL:
        return "--method sequential trains in this process, without a plan"
    if executor != "processes":
        return f"--executor {executor} runs the stages in this process"
    if torch.cuda.is_available():
        return "the stages run on GPUs (the figures are measured with gloo on the CPU)"
    return None
