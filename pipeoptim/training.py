"""The training loop behind ``pipeoptim train``: epochs, evaluation, checkpoints, records.

:func:`train` runs a built-in task (:mod:`pipeoptim.tasks`) with a pipeline method, or with
``sequential`` (plain single-process training, the reference), and writes into the run
folder:

- ``metrics.json`` -- configuration, per-epoch loss / metric / speed, the plan's summary and
  ``status`` (``running``, ``completed``, ``failed`` with ``error``, ``interrupted``); written
  as training starts (an earlier run's in the folder goes then, with its checkpoint and
  pictures), after every epoch and whenever the run stops once training has started, for
  whatever reason (stopped before, a run leaves no folder it created);
- ``train.csv`` -- one row per mini-batch: step, epoch, loss, lr; appended every
  ``record_every`` mini-batches (:class:`~pipeoptim.records.StepLog`), never held in memory;
- ``plan.json`` -- the pipeline's plan (``--plan`` trains another run on it), written once it
  is built;
- ``curves.png`` and ``plan.png`` (``plot=True``) -- loss and metric curves, the pipeline plan;
- ``checkpoint.pt`` (``checkpoint_every``) -- see :mod:`pipeoptim.checkpoint`.

``metrics.json``, ``plan.json``, the pictures and ``checkpoint.pt`` are written atomically.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

import pipeoptim
from pipeoptim import other_work
from pipeoptim.compiler.plot import plot_plan
from pipeoptim.fileio import cache_folder, finite_json, held_folder, writable_folder, write_json
from pipeoptim.loss import Loss, drain
from pipeoptim.optimizers import cosine_factor, default_weight_decay, make_optimizer
from pipeoptim.records import Progress, StepLog, epoch_line, plot_curves, run_metrics
from pipeoptim.resume import LINK_FIGURES, check_resume, on_run_plan
from pipeoptim.runtime.precision import autocast_dtype
from pipeoptim.runtime.spawning import signals_deferred
from pipeoptim.sequential import SEQUENTIAL, Sequential
from pipeoptim.tasks import Task, make_task


@dataclass
class TrainConfig:
    """Settings of one run (the options of ``pipeoptim train``)."""

    task: str
    out: str
    gpus: int = 4
    data_parallel: int | str = 1  # R, or "auto": chosen (pipeoptim.compile_layout)
    stages: int | str | None = None  # N; None: gpus / R (or chosen with R "auto"); "auto": chosen
    method: str = "pipeoptim"
    optimizer: str = "sgd"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float | None = None  # None: the optimizer's default (AdamW 0.01, the others 0)
    seed: int = 0
    data_dir: str | None = None
    limit: int | None = None
    test_limit: int | None = None
    micro_batches: int | None = None
    executor: str = "processes"
    lr_schedule: str = "cosine"
    checkpoint_every: int | None = None
    resume: str | None = None
    plot: bool = False
    progress: bool = True
    profile_dir: str | None = "profiles"
    nan_check: str = "stages"
    max_grad_norm: float | None = None
    precision: str = "float32"
    compile_stages: bool = False
    memory: int | None = None  # per-stage memory limit in bytes of the plan (stages recompute where it binds)
    bandwidth: str | float | None = "25GB/s"  # the plan's link between stages (bytes/s; None: free)
    latency: float = 0.0  # the plan's seconds per message between stages
    allreduce_bandwidth: float | None = None  # the plan's replicas' all-reduce (bytes/s; None: bandwidth's)
    allreduce_latency: float | None = None  # its seconds each beyond its bytes (None: the link's)
    action_overhead: float = 0.0  # the plan's runtime CPU seconds per action (pipeoptim.action_overhead)
    plan: str | None = None  # a plan file to train on (its layout and cut) instead of planning
    timeout: float = 300.0  # seconds any wait between stages may take before the run fails
    record_every: int = 50
    progress_every: int | None = None

    def __post_init__(self) -> None:
        if self.weight_decay is None:  # saved as a number: a resume compares it
            self.weight_decay = default_weight_decay(self.optimizer)


#: gives a config its plan's link and runtime figures (:func:`train`)
Costs = Callable[[TrainConfig], TrainConfig]


def _trainer(config: TrainConfig, task: Task, log: Callable[[str], None], plan: Any) -> tuple[Any, Any]:
    """The trainer (a pipeline, or :class:`Sequential`) and the LR scheduler on its optimizer;
    ``plan``: the pipeline's plan (:func:`pipeoptim.resume.on_run_plan`; ``None``: planned)."""
    optimizer = make_optimizer(
        config.optimizer, task.model.parameters(), config.lr, config.momentum, config.weight_decay
    )
    scheduler = None
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_factor(config.epochs * task.steps_per_epoch)
        )
    elif config.lr_schedule != "constant":
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', not {config.lr_schedule!r}")
    if config.method == SEQUENTIAL:
        if config.compile_stages:
            raise ValueError("--compile-stages compiles pipeline stages: use it with a pipeline --method")
        for option, value in (("--memory", config.memory), ("--plan", config.plan)):
            if value is not None:
                raise ValueError(f"{option} is for pipeline stages: use it with a pipeline --method")
        sequential = Sequential(
            task.model, optimizer, task.loss_fn, config.max_grad_norm, autocast_dtype(config.precision)
        )
        return sequential, scheduler
    pipe = pipeoptim.compile_layout.layout_compiler(pipeoptim.compile, config.stages, config.data_parallel)(
        task.model,
        optimizer,
        config.gpus,
        example_inputs=task.example_inputs,
        example_targets=task.example_targets,
        loss_fn=task.loss_fn,
        loss_reduction=task.loss_reduction,
        method=config.method,
        micro_batches=config.micro_batches,
        executor=config.executor,
        profile_dir=config.profile_dir,
        seed=config.seed,
        nan_check=config.nan_check,
        max_grad_norm=config.max_grad_norm,
        autocast=autocast_dtype(config.precision),
        compile_stages=config.compile_stages,
        memory=config.memory,
        plan=plan,
        timeout=config.timeout,
        **{name: getattr(config, name) for name in LINK_FIGURES},
        log=log,
        data_parallel=config.data_parallel,
    )
    return pipe, scheduler


def train(
    config: TrainConfig, log: Callable[[str], None] = print, costs: Costs | None = None
) -> dict[str, Any]:
    """Run ``config``; returns the metrics also written to ``<out>/metrics.json``.

    ``costs`` gives the config its plan's link and runtime figures (``pipeoptim train``
    measures this machine's): it is called once the run folder, the checkpoint to resume and
    the task's data have been checked, so that a mistake in them is reported at once. Into a
    folder holding an earlier run (not resumed), the run writes its own records once it starts
    training, and removes the earlier checkpoint then (``--resume`` would continue it under
    them); a run that fails before (its plan, an interrupt) leaves the folder as it was.

    Raises:
        ValueError: bad settings, a run folder that cannot be written or a profile folder that
        cannot be made, or a run
        folder another run is using (:func:`pipeoptim.fileio.held_folder`); FileNotFoundError:
        missing task data; CheckpointError: a bad ``resume``; PipeoptimError: from compile
        and training (non-finite loss, failed stage).
    """
    out = Path(config.out)
    if config.profile_dir is not None:
        cache_folder(config.profile_dir, "--profile-dir", log)
    created = writable_folder(out, "run folder", "--out")
    with held_folder(out, "run folder", "--out", log):  # refused: the folder is another run's
        try:
            return _train(config, out, log, costs)
        except BaseException:
            if created and not any(out.iterdir()):  # a run that failed early leaves no empty folder
                out.rmdir()
            raise


def _train(config: TrainConfig, out: Path, log: Callable[[str], None], costs: Costs | None) -> dict[str, Any]:
    resume_path, saved_plan = check_resume(config, log)
    torch.manual_seed(config.seed)
    task = make_task(
        config.task,
        batch_size=config.batch_size,
        seed=config.seed,
        limit=config.limit,
        data_dir=config.data_dir,
        test_limit=config.test_limit,
    )
    config = config if costs is None else costs(config)
    start = time.perf_counter()
    build = partial(_trainer, config, task, log)
    trainer, scheduler = on_run_plan(build, config, resume_path, saved_plan, log)
    run = _Run(config, task, trainer, out)
    try:
        if resume_path is not None:
            extra = trainer.load_checkpoint(resume_path)
            run.restore(extra.get("history", {}))
            if scheduler is not None:
                if extra.get("scheduler") is None:  # pipe.save_checkpoint's (a KeyError, helper-157)
                    scheduler.last_epoch = trainer.mini_batches_done
                    log(f"{resume_path} holds no learning-rate schedule: cosine goes on from its mini-batch")
                else:
                    scheduler.load_state_dict(extra["scheduler"])
                # the factor is this run's (it depends on --epochs); the stages follow at once
                for group, base, lam in zip(
                    scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
                ):
                    group["lr"] = base * lam(scheduler.last_epoch)
            log(f"resumed from {resume_path} at mini-batch {trainer.mini_batches_done}")
        # an earlier run's files in this folder (a resume's too where it writes into another
        # folder: it went on from that run's checkpoint, helper-157), kept until now: a run that
        # fails to start (a plan, an interrupt) loses nothing
        if resume_path is None or resume_path.parent.resolve() != out.resolve():
            for name in ("checkpoint.pt", "curves.png", "plan.png", "plan.json"):
                (out / name).unlink(missing_ok=True)
        if trainer.plan is not None:  # --plan trains another run on it (its layout and cut)
            trainer.plan.save(out / "plan.json")
        run.steps = StepLog(
            out / "train.csv",
            start=trainer.mini_batches_done,
            every=config.record_every,
            source=None if resume_path is None else resume_path.parent / "train.csv",
        )
        if resume_path is not None and trainer.mini_batches_done and not run.steps.kept:
            log(  # replaced without a word before (helper-136)
                f"{resume_path.parent / 'train.csv'} is missing or holds no rows: this run's train.csv "
                f"starts at mini-batch {trainer.mini_batches_done}"
            )
        run.write(time.perf_counter() - start, "running")  # an earlier run's stays no longer
        _loop(config, task, trainer, scheduler, run, log)
    except BaseException as exc:  # whatever stops the run, what it learned stays on disk
        try:
            run.stop(exc, time.perf_counter() - start)
        finally:  # a Ctrl-C or a failure: the mini-batches in flight are dropped
            trainer.close(finish=False)
        raise
    trainer.close()
    metrics = run.write(time.perf_counter() - start, "completed")
    if config.plot:
        title = f"{config.task} / {config.method}"
        plot_curves(out / "train.csv", run.epochs, task.metric, out / "curves.png", title=title)
        if trainer.plan is not None:  # sequential training has none
            plot_plan(trainer.plan, out / "plan.png")
    return metrics


class _Run:
    """What a run has learned so far, and its files: per-epoch records in memory (a few per
    epoch), per-mini-batch rows on disk (:class:`~pipeoptim.records.StepLog`)."""

    def __init__(self, config: TrainConfig, task: Task, trainer: Any, out: Path) -> None:
        self.config = config
        self.task = task
        self.trainer = trainer
        self.out = out
        self.epochs: list[dict[str, Any]] = []
        self.loss_sum = 0.0  # of the current epoch, for its mean train loss
        self.loss_count = 0
        self.steps: StepLog | None = None
        self.done = 0  # mini-batches whose loss has come back (a resume's: see restore)
        self.start = time.perf_counter()

    def history(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the records exactly."""
        return {"epochs": self.epochs, "epoch_loss": [self.loss_sum, self.loss_count]}

    def restore(self, history: dict[str, Any]) -> None:
        """Take the records of the checkpoint the trainer has just loaded."""
        self.done = self.trainer.mini_batches_done
        self.epochs = list(history.get("epochs", []))
        self.loss_sum, self.loss_count = history.get("epoch_loss", [0.0, 0])

    def add(self, step: int, epoch: int, loss: float, lr: float) -> None:
        assert self.steps is not None
        self.steps.add(step, epoch, loss, lr)
        self.done = step + 1
        self.loss_sum += loss
        self.loss_count += 1

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.epochs.append(record)
        self.loss_sum, self.loss_count = 0.0, 0

    def write(self, wall: float, status: str, error: str | None = None) -> dict[str, Any]:
        """Flush ``train.csv`` and write ``metrics.json`` (atomically); returns the metrics."""
        if self.steps is not None:
            self.steps.flush()
        metrics = finite_json(run_metrics(self.config, self.task, self.trainer, self.epochs, wall, self.done))
        metrics["status"] = status
        if error is not None:
            metrics["error"] = error
        write_json(self.out / "metrics.json", metrics)
        return metrics

    def stop(self, exc: BaseException, wall: float) -> None:
        """Record a run that did not finish (error, killed stage, Ctrl-C), if it got going."""
        if self.steps is None:
            return
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        # a second Ctrl-C (a terminal's and `timeout`'s forwarded one arrive together) waits
        # for the record; the original error matters more than its record
        with signals_deferred(), contextlib.suppress(Exception):
            self.write(wall, status, None if status == "interrupted" else f"{type(exc).__name__}: {exc}")


def _loop(
    config: TrainConfig,
    task: Task,
    trainer: Any,
    scheduler: Any,
    run: _Run,
    log: Callable[[str], None],
) -> None:
    per_epoch = task.steps_per_epoch
    step = trainer.mini_batches_done
    pending: deque[tuple[int, int, float, Loss]] = deque()
    progress = Progress(
        total=config.epochs * per_epoch,
        done=step,
        every=config.progress_every or max(1, per_epoch // 10),
        log=log,
        enabled=config.progress,
    )

    def read_losses(everything: bool) -> None:
        for s, epoch, lr, loss in drain(pending, trainer.num_stages, everything, lambda e: e[3]):
            value = loss.wait()
            run.add(s, epoch, value, lr)
            progress.update(epoch, config.epochs, value)

    def checkpoint() -> None:
        extra = {
            "history": run.history(),
            "config": asdict(config),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
        }
        assert run.steps is not None
        # rows first: a kill between the two leaves rows past the checkpoint, which a resume
        # drops, not a checkpoint past the rows, a gap a resume kept (helper-157)
        run.steps.flush()
        trainer.save_checkpoint(run.out / "checkpoint.pt", extra)

    try:
        for epoch in range(step // per_epoch, config.epochs):
            offset = step - epoch * per_epoch
            tic, saving = time.perf_counter(), 0.0  # saving: seconds spent on checkpoints
            others = other_work.OtherWork() if other_work.available() else None
            for i, (inputs, targets) in enumerate(task.batches(epoch)):
                if i < offset:
                    continue
                lr = config.lr if scheduler is None else scheduler.optimizer.param_groups[0]["lr"]
                pending.append((step, epoch, lr, trainer.step(inputs, targets)))
                if scheduler is not None:
                    scheduler.step()  # the stages read the new learning rate with the next mini-batch
                step += 1
                read_losses(False)
                # not at the epoch's last mini-batch: the checkpoint after its evaluation follows,
                # and one before it, resumed, skipped the epoch's record (helper-124)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step % per_epoch:
                    started = time.perf_counter()
                    trainer.flush()
                    read_losses(True)
                    with progress.paused():
                        checkpoint()
                    saving += time.perf_counter() - started
            trainer.flush()
            read_losses(True)
            seconds = time.perf_counter() - tic
            other_cpu = None if others is None else others.share()
            with progress.paused():
                value = task.evaluate(trainer.predict)
            training_s = seconds - saving  # the rate is of training, not of saving checkpoints
            rate = (per_epoch - offset) / training_s if training_s > 0 else None
            predicted = None if trainer.plan is None else trainer.plan.summary.get("throughput_per_s")
            record = {
                "epoch": epoch + 1,
                "train_loss": run.loss_sum / max(run.loss_count, 1),
                task.metric: value,
                "seconds": seconds,
                "checkpoint_s": saving,
                "mini_batches_per_s": rate,
                # measured / the plan's predicted rate (the epoch's flush included)
                "of_plan": rate / predicted if rate and predicted else None,
                # other processes' share of this job's cores' time during the epoch
                "other_cpu": other_cpu,
            }
            run.end_epoch(record)
            log(epoch_line(record, config.epochs, task.metric, predicted))
            run.write(time.perf_counter() - run.start, "running")
            if config.checkpoint_every:
                with progress.paused():
                    checkpoint()
    finally:
        progress.close()
