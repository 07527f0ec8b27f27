"""Prediction error against staleness, per optimizer: where PipeOptim's Ŵ helps.

PipeOptim (Guan et al., arXiv:2312.00839) predicts a stage's weights s steps ahead as
``Ŵ = W − lr·s·ΔW`` with ΔW the optimizer's update direction. With momentum or Adam's moments,
ΔW averages many gradients; without momentum (SGD, RMSprop) it is the last gradient alone, and
Ŵ extrapolates that one gradient's noise s steps. This benchmark measures, on the digits task
(4 stages of equal node counts, local executor, every micro-batch sampled), the *prediction error*
``‖W_fwd − W_bwd‖ / ‖W_bwd‖`` and the *staleness* ``‖W_cur − W_bwd‖ / ‖W_bwd‖`` it corrects
(:mod:`pipeoptim.runtime.staleness`), stage by stage; a ratio below 1 means the prediction
helps.

    python benchmarks/prediction_error.py [--quick] [--seeds 3] [--epochs 3] [--out DIR]

Writes ``prediction_error.md`` into ``benchmarks/results`` for the full run; ``--quick`` (SGD
with and without momentum, one seed, one epoch) and other ``--seeds`` or ``--epochs`` write
into a new temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from outputs import OUT_HELP, host, results_dir, run_kind, write_result
from tabulate import tabulate

import pipeoptim
from pipeoptim.compiler import plan_model
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.tasks import make_task

STAGES, BATCH = 4, 32


class Setting(NamedTuple):
    """One optimizer configuration: its name in the table, how to build it, the predictor."""

    name: str
    make: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
    predictor: str = "paper"


SETTINGS = (
    Setting("SGD lr 0.05", lambda p: torch.optim.SGD(p, lr=0.05)),
    Setting("SGD lr 0.05, momentum 0.9", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    Setting("RMSprop lr 1e-3", lambda p: torch.optim.RMSprop(p, lr=1e-3)),
    Setting("RMSprop lr 1e-3", lambda p: torch.optim.RMSprop(p, lr=1e-3), "next-step"),
    Setting("RMSprop lr 1e-3, momentum 0.9", lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9)),
    Setting("Adagrad lr 0.01", lambda p: torch.optim.Adagrad(p, lr=0.01)),
    Setting("Adam lr 1e-3", lambda p: torch.optim.Adam(p, lr=1e-3)),
    Setting("Adam lr 1e-3", lambda p: torch.optim.Adam(p, lr=1e-3), "next-step"),
    Setting("AdamW lr 1e-3, decay 0.01", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01)),
)


def measure(setting: Setting, seed: int, epochs: int) -> tuple[list[float], list[float], float]:
    """Train digits with PipeOptim; per stage with a version difference (the last has none),
    the mean prediction error and staleness over every micro-batch; the test accuracy."""
    task = make_task("digits", batch_size=BATCH, seed=seed)
    torch.manual_seed(seed)
    model = task.model
    # a uniform plan (equal node counts per stage), the same in every run: a plan from measured
    # times moved a layer between runs and with it the stages' numbers
    plan = plan_model(
        model, task.example_inputs, CostConfig(num_stages=STAGES), partitioner="uniform", profile_dir=None
    ).plan
    with pipeoptim.compile(
        model,
        setting.make(model.parameters()),
        STAGES,
        example_inputs=task.example_inputs,
        loss_fn=task.loss_fn,
        loss_reduction=task.loss_reduction,
        method="pipeoptim",
        executor="local",
        profile_dir=None,
        plan=plan,
        seed=seed,
        predictor=setting.predictor,
        prediction_error_every=1,
    ) as pipe:
        for epoch in range(epochs):
            for inputs, targets in task.batches(epoch):
                pipe.step(inputs, targets)
        pipe.flush()
        stats = pipe.stats()
        accuracy = task.evaluate(pipe.predict)
    errors, staleness = stats.prediction_error[: STAGES - 1], stats.staleness[: STAGES - 1]
    assert None not in errors and None not in staleness, "every stage before the last was sampled"
    return errors, staleness, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SGD with and without momentum, 1 seed, 1 epoch")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=None, help=OUT_HELP)
    args = parser.parse_args()
    for name in ("seeds", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)
    settings = SETTINGS[:2] if args.quick else SETTINGS
    out = results_dir(parser, args, "prediction_error", scope=("seeds", "epochs"))
    rows, ratios = [], {}
    for setting in settings:
        runs = [measure(setting, seed, epochs) for seed in range(seeds)]
        per_stage = [statistics.mean(err[k] / stale[k] for err, stale, _ in runs) for k in range(STAGES - 1)]
        ratios[setting] = statistics.mean(per_stage)
        err = [statistics.mean(r[0][k] for r in runs) for k in range(STAGES - 1)]
        stale = [statistics.mean(r[1][k] for r in runs) for k in range(STAGES - 1)]
        accuracy = statistics.mean(r[2] for r in runs)
        rows.append(
            [setting.name, setting.predictor]
            + [f"{e:.4f} / {s:.4f} = {q:.2f}" for e, s, q in zip(err, stale, per_stage)]
            + [f"{ratios[setting]:.2f}", f"{accuracy:.3f}"]
        )
        print(f"{setting.name} ({setting.predictor}): error / staleness {ratios[setting]:.2f}x", flush=True)
    headers = ["optimizer", "predictor"] + [f"stage {k}: error / staleness" for k in range(STAGES - 1)]
    table = tabulate(rows, headers=[*headers, "mean ratio", "test accuracy"], tablefmt="github")
    command = "python benchmarks/prediction_error.py" + (" --quick" if args.quick else "")
    text = (
        f"# Prediction error against staleness, per optimizer ({run_kind(parser, args, ('seeds', 'epochs'))}"
        f" run; {host()})\n\n"
        f"PipeOptim on digits, {STAGES} stages (the last has no version difference), local executor, "
        f"mini-batch {BATCH}, {epochs} epoch(s), every micro-batch sampled, means over {seeds} seed(s). "
        "Each cell: the mean prediction error ‖W_fwd − W_bwd‖ / ‖W_bwd‖, the mean staleness "
        "‖W_cur − W_bwd‖ / ‖W_bwd‖ it corrects, and their ratio (below 1: the prediction helps). "
        f"Written by `{command}`.\n\n{table}\n"
    )
    write_result(out / "prediction_error.md", text)
    print(table)
    print(
        "prediction error / staleness: "
        + ", ".join(f"{s.name} ({s.predictor}) {q:.2f}x" for s, q in ratios.items())
    )


if __name__ == "__main__":
    main()
