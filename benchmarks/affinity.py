"""Ranks bound to cores against ranks left to the scheduler, side by side in one run.

PipeOptim on the MLP of ``throughput.py`` (16x512, mini-batch 64, CPU gloo, one thread per
rank), compiled twice with the processes executor: once as the runtime runs by default, each
worker and its gloo threads bound to its cores (:mod:`pipeoptim.runtime.affinity`), once with
``PIPEOPTIM_CPU_AFFINITY=off``. Their timed windows take turns (this host's speed drifts over
seconds); each rate is the median of its windows, and the ratio bound / unbound is printed per
stage count.

    python benchmarks/affinity.py [--quick] [--stages 2 4] [--out DIR]

Writes ``affinity.md`` into ``--out``: ``benchmarks/results`` for the full run, a new
temporary folder for ``--quick`` or other ``--stages``.
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

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent))
from outputs import results_dir, run_kind, stage_count
from throughput import BATCH, batch, compile_model

from pipeoptim.runtime.affinity import AFFINITY_ENV


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


def measure(stages: int, windows: int, steps: int, profile_dir: Path) -> dict[str, list[float]]:
    """Per setting ("bound", "unbound"), the rates of its ``windows`` windows, taking turns."""
    data = [batch(seed) for seed in range(8)]
    rates: dict[str, list[float]] = {"bound": [], "unbound": []}
    with contextlib.ExitStack() as stack:
        pipes = {}
        for name, setting in (("bound", None), ("unbound", "off")):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 stages, few windows")
    parser.add_argument("--stages", type=stage_count, nargs="+", default=[2, 4])
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results for the full run, else a temporary folder"
    )
    args = parser.parse_args()
    kind = run_kind(parser, args, ("stages",))
    out = results_dir(parser, args, "affinity", scope=("stages",))
    torch.set_num_threads(1)
    stage_counts = [2] if args.quick and args.stages == parser.get_default("stages") else args.stages
    windows, steps = (2, 8) if args.quick else (8, 40)
    rows, summary = [], []
    with tempfile.TemporaryDirectory(prefix="affinity-profiles-") as folder:
        for stages in stage_counts:
            rates = measure(stages, windows, steps, Path(folder))
            bound, unbound = (statistics.median(rates[k]) for k in ("bound", "unbound"))
            ratios = [b / u for b, u in zip(rates["bound"], rates["unbound"])]
            rows.append(
                [
                    stages,
                    f"{bound:.1f}",
                    f"{unbound:.1f}",
                    f"{bound / unbound:.3f}",
                    f"{min(ratios):.2f}-{max(ratios):.2f}",
                ]
            )
            summary.append(f"{bound / unbound:.3f}x at {stages} stages")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"# Ranks bound to cores against left to the scheduler ({kind} run, {when}, "
        f"{os.cpu_count()} cores)\n\n"
        f"PipeOptim, MLP 16x512, mini-batch {BATCH}, processes executor, one thread per rank; "
        f"{windows} windows of {steps} mini-batches each, taking turns; rates are medians, the "
        "range is that of the window-by-window ratios.\n\n"
        + tabulate(
            rows,
            headers=[
                "stages",
                "bound /s",
                "unbound /s",
                "bound / unbound",
                "windows",
            ],
            tablefmt="github",
        )
        + "\n"
    )
    print(text)
    print(f"pipeoptim on the MLP, ranks bound / left to the scheduler: {'; '.join(summary)}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "affinity.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "affinity.md")
    print(f"results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
