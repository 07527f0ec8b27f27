"""Ranks bound to cores against ranks left to the scheduler, side by side in one run.

PipeOptim on the MLP of ``throughput.py`` (16x512, mini-batch 64, CPU gloo, one thread per
rank), as the runtime runs by default, each rank and its gloo threads bound to its cores
(:mod:`pipeoptim.runtime.affinity`), and with ``PIPEOPTIM_CPU_AFFINITY=off``, launched two ways:

- as torchrun launches a job (one process per stage, each feeding its own stage; no driver):
  a job per setting, the two taking turns ``--rounds`` times; a job's rate is the median of its
  windows, a round's ratio that of its two jobs;
- with the processes executor (this process drives the worker processes): both pipelines
  compiled at once, their windows taking turns; the ratio is the median of the windows' ratios.

Each row prints the median rates and the median and range of the round-by-round (torchrun) or
window-by-window (processes) ratios bound / unbound.

    python benchmarks/affinity.py [--quick] [--stages 2 4] [--rounds 3] [--out DIR]

Writes ``affinity.md`` into ``--out``: ``benchmarks/results`` for the full run, a new
temporary folder for ``--quick`` or other ``--stages`` or ``--rounds``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent))
from outputs import OUT_HELP, host, results_dir, run_kind, stage_count, write_result
from throughput import BATCH, as_torchrun_rank, batch, compile_model, run_ranks

from pipeoptim.runtime.affinity import AFFINITY_ENV

#: the two settings measured: the runtime's default, and the binding turned off
SETTINGS = (("bound", None), ("unbound", "off"))


@contextlib.contextmanager
def affinity(setting: str | None) -> Iterator[None]:
    """:data:`AFFINITY_ENV` set to ``setting`` (unset for ``None``) while compiling: the
    workers take the driver's environment when they start."""
    before = os.environ.pop(AFFINITY_ENV, None)
    if setting is not None:
        os.environ[AFFINITY_ENV] = setting
    try:
        yield
    finally:
        os.environ.pop(AFFINITY_ENV, None)
        if before is not None:
            os.environ[AFFINITY_ENV] = before


def window_rate(pipe: object, data: list, steps: int) -> float:
    """Mini-batches per second of ``steps`` mini-batches, the pipeline drained after them."""
    start = time.perf_counter()
    for i in range(steps):
        pipe.step(*data[i % len(data)])
    pipe.flush()
    return steps / (time.perf_counter() - start)


def measure_processes(stages: int, windows: int, steps: int, profile_dir: Path) -> dict[str, list[float]]:
    """Per setting ("bound", "unbound"), the rates of its ``windows`` windows with the processes
    executor, taking turns."""
    data = [batch(seed) for seed in range(8)]
    rates: dict[str, list[float]] = {"bound": [], "unbound": []}
    with contextlib.ExitStack() as stack:
        pipes = {}
        for name, setting in SETTINGS:
            with affinity(setting):
                pipes[name] = stack.enter_context(
                    compile_model("mlp", "pipeoptim", stages, "processes", profile_dir, BATCH)
                )
        for pipe in pipes.values():  # warm-up
            window_rate(pipe, data, 2 * stages)
        for _ in range(windows):
            for name, pipe in pipes.items():
                rates[name].append(window_rate(pipe, data, steps))
    return rates


def _torchrun_rank(
    rank: int, world: int, port: int, setting: str | None, windows: int, steps: int, folder: str, out: Any
) -> None:
    """One rank of a torchrun job with the affinity ``setting``: its windows' rates on ``out``."""
    as_torchrun_rank(rank, world, port)
    with affinity(setting), compile_model("mlp", "pipeoptim", world, "torchrun", Path(folder), BATCH) as pipe:
        x, y = batch(0)
        feed = [(x if rank == 0 else None, y if rank == world - 1 else None)]
        window_rate(pipe, feed, 2 * world)  # warm-up
        out.put((rank, [window_rate(pipe, feed, steps) for _ in range(windows)]))


def measure_torchrun(
    stages: int, rounds: int, windows: int, steps: int, profile_dir: Path
) -> dict[str, list[float]]:
    """Per setting, the median rate of each of ``rounds`` torchrun jobs (the last rank's
    windows), the two settings' jobs taking turns."""
    rates: dict[str, list[float]] = {"bound": [], "unbound": []}
    for _ in range(rounds):
        for name, setting in SETTINGS:
            parts = run_ranks(
                _torchrun_rank, stages, (setting, windows, steps, str(profile_dir)), f"{name} job"
            )
            rates[name].append(statistics.median(parts[stages - 1]))
    return rates


def row(launch: str, stages: int, rates: dict[str, list[float]]) -> tuple[list[Any], str]:
    """A table row and a summary part: median rates, and the median and range of the paired
    ratios (round by round, or window by window): the host's speed drifts between rounds, so
    the ratio of the two median rates (reported before, helper-152) pairs runs of other
    moments."""
    bound, unbound = (statistics.median(rates[k]) for k in ("bound", "unbound"))
    ratios = [b / u for b, u in zip(rates["bound"], rates["unbound"])]
    ratio, spread = statistics.median(ratios), f"{min(ratios):.2f}-{max(ratios):.2f}"
    cells = [launch, stages, f"{bound:.1f}", f"{unbound:.1f}", f"{ratio:.3f}", spread]
    return cells, f"{ratio:.3f}x {launch} at {stages} stages"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 stages (unless --stages), one round (unless --rounds), few windows",
    )
    parser.add_argument("--stages", type=stage_count, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3, help="torchrun jobs per setting (default 3)")
    parser.add_argument("--out", type=Path, help=OUT_HELP)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    scope = ("stages", "rounds")
    kind = run_kind(parser, args, scope)
    out = results_dir(parser, args, "affinity", scope=scope)
    torch.set_num_threads(1)
    stage_counts = [2] if args.quick and args.stages == parser.get_default("stages") else args.stages
    rounds = 1 if args.quick and args.rounds == parser.get_default("rounds") else args.rounds  # given: kept
    windows, steps = (2, 8) if args.quick else (8, 40)
    rows, summary = [], []
    with tempfile.TemporaryDirectory(prefix="affinity-profiles-") as folder:
        for stages in stage_counts:
            for launch, rates in (
                ("torchrun", measure_torchrun(stages, rounds, windows, steps, Path(folder))),
                ("processes", measure_processes(stages, windows, steps, Path(folder))),
            ):
                cells, part = row(launch, stages, rates)
                rows.append(cells)
                summary.append(part)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"# Ranks bound to cores against left to the scheduler ({kind} run, {when}, "
        f"{host()})\n\n"
        f"PipeOptim, MLP 16x512, mini-batch {BATCH}, one thread per rank, windows of {steps} "
        f"mini-batches after a warm-up; torchrun: {rounds} job(s) per setting taking turns, "
        f"{windows} windows each, the ratio the median of the rounds' ratios and the range theirs; "
        f"processes executor: {windows} windows per setting taking turns, the ratio and range those "
        "of the windows' ratios. Rates are medians.\n\n"
        + tabulate(
            rows,
            headers=["launch", "stages", "bound /s", "unbound /s", "bound / unbound", "range"],
            tablefmt="github",
        )
        + "\n"
    )
    print(text)
    print(f"pipeoptim on the MLP, ranks bound / left to the scheduler: {'; '.join(summary)}")
    write_result(out / "affinity.md", text)
    print(f"results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
