"""Staleness study: where each method separates, at pipeline depths N = 1 (sequential) to 16.

Every cell trains one (setting, method, depth, seed) with the deterministic local executor,
which computes exactly what one worker process per stage computes (the tests check it), so
depth can be studied on a CPU: in asynchronous 1F1B stage k's forward is ``N − k − 1``
optimizer steps older than its backward. The plans are **uniform** (equal node counts per
stage, ``partitioner="uniform"``): the point here is staleness, not balance; on the small
models some stages hold no parameter (they have no weights to be stale).

Methods: ``sequential`` (N = 1, the reference; ``gpipe`` with one micro-batch equals it at
every depth, which the tests check to 1e-6, so it is not run again), ``none``, ``pipedream``,
``2bw`` (M = N micro-batches), ``spectrain`` (SGD with momentum only), ``pipeoptim`` (the
paper's ΔW), ``pipeoptim-next`` (``predictor="next-step"``; for SGD the same rule as the
paper's, so only run with Adam/AdamW) and ``pipeoptim-buffer`` (SGD only: ΔW = the momentum
buffer alone, ``lr·b``, registered through ``pipeoptim.register_predictor``). Each cell
records the final test metric, the training loss of every mini-batch, and per stage the
prediction error ``‖W_fwd − W_bwd‖ / ‖W_bwd‖`` and the staleness ``‖W_cur − W_bwd‖ / ‖W_bwd‖`` of
the weights current at the forward on the same run (``pipe.stats()``, every mini-batch sampled).

Each cell's result is one JSON file under ``--work``; a rerun skips finished cells, so an
interrupted study continues where it stopped. ``--budget`` stops starting new cells after
that many seconds; cells run in :func:`priority` order, cheapest first within it.

    python benchmarks/staleness.py [--quick] [--work DIR] [--out benchmarks/results] [--budget S]

Writes ``staleness.md`` and ``staleness_*.png`` into ``--out`` (:mod:`staleness_report`);
``--quick`` (digits, 24 mini-batches, N = 1, 2, 4) and runs with other ``--seeds``, a
``--budget`` or ``--long`` write into a new temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from outputs import (
    OUT_HELP,
    missing_tasks,
    positive_int,
    positive_seconds,
    results_dir,
    run_kind,
    work_folder,
)
from staleness_report import report

import pipeoptim
from pipeoptim.compiler import plan_model
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.errors import NonFiniteLossError
from pipeoptim.fileio import write_json
from pipeoptim.sequential import Sequential
from pipeoptim.tasks import make_task
from pipeoptim.tasks.images import ConvNet

DEPTHS = [1, 2, 4, 8, 16]
SGD_METHODS = ["none", "pipedream", "2bw", "spectrain", "pipeoptim", "pipeoptim-buffer"]
#: seconds per mini-batch relative to the small Fashion-MNIST CNN (measured here, batch 32)
TASK_COST = {"digits": 0.5, "fashion-mnist": 1.0, "sst2": 2.0, "multi30k": 10.0}
ADAM_METHODS = ["none", "pipedream", "2bw", "pipeoptim", "pipeoptim-next"]


class BufferSGD(torch.optim.SGD):
    """``torch.optim.SGD``, for which PipeOptim predicts with the momentum buffer alone."""


def momentum_buffer_update(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """The next update taken as ``lr · b``, SGD's momentum buffer b alone (SpecTrain's
    smoothed gradient), instead of PipeOptim's ΔW; ``None`` before the first step."""
    buf = state.get("momentum_buffer")
    return None if buf is None else buf * float(group["lr"])


pipeoptim.register_predictor(BufferSGD, momentum_buffer_update)


@dataclass(frozen=True)
class Setting:
    """One task trained one way (the rows of a panel).

    Attributes:
        name: key of the setting (file names, tables).
        task: built-in task (:mod:`pipeoptim.tasks`).
        optimizer: ``sgd`` (momentum 0.9), ``adamw`` (weight decay 0.01) or ``adam``.
        lr: peak learning rate.
        epochs, batch_size, limit, test_limit: training length and data (examples).
        warmup: fraction of the mini-batches with a linear warm-up before the cosine decay.
        small_cnn: the image CNN with channels (8, 16, 32) and 64 hidden units (a quarter of
            the task's default compute, to fit the study on two shared cores).
        methods: the pipeline methods run at N > 1.
        validation: evaluate on this many training examples after the first ``limit``, held
            out from training, instead of the test split (the learning-rate sweep: a rate
            chosen on the test split would leave no unseen data to report).
    """

    name: str
    task: str
    optimizer: str
    lr: float
    epochs: int
    batch_size: int
    limit: int | None
    test_limit: int | None
    warmup: float = 0.0
    small_cnn: bool = False
    methods: tuple[str, ...] = field(default_factory=tuple)
    validation: int | None = None


@dataclass(frozen=True)
class Cell:
    setting: Setting
    method: str
    depth: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.setting.name}-{self.method}-N{self.depth}-s{self.seed}"

    @property
    def cost(self) -> float:
        """Rough relative cost: mini-batches, times the per-stage overhead of deep pipelines."""
        s = self.setting
        batches = s.epochs * (s.limit or 60000) / s.batch_size * TASK_COST.get(s.task, 1.0)
        return batches * (1 + 0.1 * self.depth) * (self.depth if self.method == "2bw" else 1) ** 0.5


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """Factor on the peak rate: linear warm-up over ``warmup`` mini-batches (Goyal et al. 2017),
    then cosine annealing to zero (Loshchilov & Hutter, ICLR 2017, eq. 5, one cycle, η_min = 0)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min(step - warmup, total - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * done))

    return factor


def _optimizer(setting: Setting, method: str, params: Any) -> torch.optim.Optimizer:
    if setting.optimizer == "sgd":
        cls = BufferSGD if method == "pipeoptim-buffer" else torch.optim.SGD
        return cls(params, lr=setting.lr, momentum=0.9)
    if setting.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=setting.lr, weight_decay=0.01)
    return torch.optim.Adam(params, lr=setting.lr)


def _trainer(cell: Cell, task: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, work: Path) -> Any:
    if cell.method == "sequential":
        return Sequential(model, opt, task.loss_fn)
    method = cell.method.split("-")[0]
    m = cell.depth if method == "2bw" else 1
    example = tuple(x[: x.shape[0] // m] for x in task.example_inputs)
    config = CostConfig(num_stages=cell.depth, method=method, micro_batches=m)
    plan = plan_model(model, example, config, partitioner="uniform", profile_dir=work / "profiles").plan
    return pipeoptim.compile(
        model,
        opt,
        cell.depth,
        example_inputs=task.example_inputs,
        loss_fn=task.loss_fn,
        loss_reduction=task.loss_reduction,
        method=method,
        micro_batches=m if method == "2bw" else None,
        plan=plan,
        executor="local",
        profile_dir=None,
        seed=cell.seed,
        predictor="next-step" if cell.method == "pipeoptim-next" else "paper",
        nan_check="loss",
        prediction_error_every=1,
    )


def run_cell(cell: Cell, work: Path) -> dict[str, Any] | None:
    """Train one cell, or read it back if an earlier invocation finished it; ``None`` where
    the task's data is absent."""
    path = work / "cells" / f"{cell.key}.json"
    if path.exists():
        return json.loads(path.read_text())
    s = cell.setting
    try:
        task = make_task(
            s.task,
            batch_size=s.batch_size,
            seed=cell.seed,
            limit=s.limit,
            test_limit=None if s.validation else s.test_limit,
            validation=s.validation,
        )
    except FileNotFoundError as exc:
        print(f"  skipping {s.name}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return None
    torch.manual_seed(cell.seed)
    model = ConvNet(28, (8, 16, 32), 64) if s.small_cnn else task.model
    opt = _optimizer(s, cell.method, model.parameters())
    total = s.epochs * task.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, int(s.warmup * total)))
    tic = time.perf_counter()
    trainer = _trainer(cell, task, model, opt, work)
    losses: list[float] = []
    pending: deque = deque()
    diverged = None
    try:
        for epoch in range(s.epochs):
            for inputs, targets in task.batches(epoch):
                pending.append(trainer.step(inputs, targets))
                scheduler.step()
                while pending and (pending[0].done() or len(pending) > trainer.num_stages):
                    losses.append(pending.popleft().wait())
        trainer.flush()
        losses.extend(loss.wait() for loss in pending)
        metric = task.evaluate(trainer.predict)
    except NonFiniteLossError as exc:
        diverged, metric = str(exc).split(":")[0], None
    stats = trainer.stats() if cell.method != "sequential" else None
    trainer.close()
    result = {
        "cell": {**asdict(cell), "key": cell.key},
        "metric_name": task.metric,
        "metric": metric,
        "diverged": diverged,
        "losses": losses,
        "mini_batches": total,
        "wall_s": time.perf_counter() - tic,
        "prediction_error": None if stats is None else stats.prediction_error,
        "prediction_error_samples": None if stats is None else stats.prediction_error_samples,
        "staleness": None if stats is None else stats.staleness,
        "peak_weight_versions": None if stats is None else stats.peak_weight_versions,
    }
    write_json(path, result)
    return result


def settings(quick: bool) -> list[Setting]:
    """The study's settings (``--quick``: one tiny digits setting)."""
    if quick:
        return [Setting("digits-sgd", "digits", "sgd", 0.05, 1, 32, 768, 200, methods=("none", "pipeoptim"))]
    fmnist = {"task": "fashion-mnist", "epochs": 1, "batch_size": 32, "limit": 6400, "test_limit": 2000}
    return [
        *(
            Setting(
                f"fmnist-sgd-sweep-val-{lr}",
                optimizer="sgd",
                lr=lr,
                small_cnn=True,
                validation=2000,
                **fmnist,
            )
            for lr in (0.01, 0.03, 0.1, 0.3)
        ),
        Setting(
            "sst2-adamw", "sst2", "adamw", 1e-3, 1, 32, 4800, 872, warmup=0.1, methods=tuple(ADAM_METHODS)
        ),
        # sequential only: how far Multi30K gets per minute here (BLEU after 250 mini-batches)
        Setting("multi30k-adam", "multi30k", "adam", 1e-3, 1, 32, 8000, 200),
    ]


def long_settings() -> list[Setting]:
    """``--long``: Multi30K long enough for a real BLEU (15 epochs of the 29,000 pairs, 13,590
    mini-batches per cell; not run on the 2-core machine, see staleness.md)."""
    return [
        Setting(
            "multi30k-adam-long",
            "multi30k",
            "adam",
            1e-3,
            15,
            32,
            None,
            None,
            0.05,
            methods=tuple(ADAM_METHODS),
        )
    ]


def fmnist_study(best_lr: float) -> list[Setting]:
    """The Fashion-MNIST settings at the best swept rate and 3x it (the paper's regime)."""
    common = {"task": "fashion-mnist", "epochs": 1, "batch_size": 32, "limit": 6400, "test_limit": 2000}
    return [
        Setting(
            f"fmnist-sgd-lr{lr:g}",
            optimizer="sgd",
            lr=lr,
            small_cnn=True,
            methods=tuple(SGD_METHODS),
            **common,
        )
        for lr in (best_lr, 3 * best_lr)
    ]


def cells_of(setting: Setting, depths: list[int], seeds: list[int]) -> list[Cell]:
    out = [Cell(setting, "sequential", 1, seed) for seed in seeds]
    out += [Cell(setting, m, n, seed) for seed in seeds for n in depths if n > 1 for m in setting.methods]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 24 mini-batches, N = 1, 2, 4, one seed")
    parser.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    parser.add_argument("--work", type=Path, default=None, help="cell results (default: a temporary folder)")
    parser.add_argument("--seeds", type=positive_int, help="seeds per cell (default 3; 1 with --quick)")
    parser.add_argument("--long", action="store_true", help="also the long Multi30K setting (hours per cell)")
    parser.add_argument(
        "--budget", type=positive_seconds, default=None, help="start no new cell after this many seconds"
    )
    args = parser.parse_args()
    if args.quick and args.long:  # the quick study queued the 11 cells of hours each (helper-152)
        parser.error("--long adds Multi30K cells of hours each, --quick makes the study seconds: pick one")
    work_folder(parser, args.work)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        scope = {"seeds": 3, "budget": None, "long": False}
        tasks = {s.task for s in settings(args.quick) + (long_settings() if args.long else [])}
        out = results_dir(parser, args, "staleness", scope, needs=lambda: missing_tasks(sorted(tasks)))
        work = args.work or Path(tmp) / "work"
        start = time.perf_counter()
        seeds = list(range(args.seeds or (1 if args.quick else 3)))
        results = run_study(args.quick, work, seeds, start, args.budget, args.long)
        report(results, out, run_kind(parser, args, scope), wall_s=time.perf_counter() - start)


def run_study(
    quick: bool, work: Path, seeds: list[int], start: float, budget: float | None, long: bool = False
) -> list[dict]:
    """Run (or read back) the learning-rate sweep, then every cell in :func:`priority` order."""
    depths = [1, 2, 4] if quick else DEPTHS
    results: list[dict] = []

    def go(cells: list[Cell]) -> None:
        for cell in sorted(cells, key=priority):
            late = budget is not None and time.perf_counter() - start > budget
            if late and not (work / "cells" / f"{cell.key}.json").exists():
                continue
            print(f"  {cell.key} ...", file=sys.stderr, flush=True)
            try:
                result = run_cell(cell, work)
            except Exception as exc:  # a failed cell is reported and retried by the next invocation
                print(f"  {cell.key} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                continue
            if result is not None:
                results.append(result)

    base = settings(quick)
    sweep = [s for s in base if "sweep" in s.name]
    go([Cell(s, "sequential", 1, 0) for s in sweep])
    done = [r for r in results if r["metric"] is not None]
    study = list(base) if quick else [s for s in base if "sweep" not in s.name]
    if done and not quick:
        best = max(done, key=lambda r: r["metric"])["cell"]["setting"]["lr"]
        study = fmnist_study(best) + study
    if long:
        study += long_settings()
    go([c for seed in seeds for s in study for c in cells_of(s, depths, [seed])])
    return results


def priority(cell: Cell) -> tuple[int, int, float]:
    """Order of the cells: seed 0 of Fashion-MNIST, then of SST-2, then the other seeds of the
    key Fashion-MNIST methods, then Multi30K, then the rest; cheapest first within each."""
    image = cell.setting.task in ("fashion-mnist", "digits")
    if cell.seed == 0 and image:
        rank = 0
    elif cell.seed == 0 and cell.setting.task == "sst2":
        rank = 1
    elif image and cell.method in ("sequential", "none", "pipedream", "pipeoptim"):
        rank = 2
    elif cell.setting.task == "multi30k":
        rank = 3
    else:
        rank = 4
    return rank, cell.seed, cell.cost


if __name__ == "__main__":
    main()
