"""What ranks on one CPU's cores slow down for each other: memory, not compute.

Each part runs in one process bound to core 0 alone, then in one process per core at once
(one thread each, started together), taking turns ``--rounds`` times; each cell is the median
over rounds of the mean time per repetition, and ``together / alone`` their ratio:

- ``compute``: a 256x256 matrix product (its operands in the core's own cache);
- ``stream``: copying a 64 MiB float32 buffer into another (beyond the last-level cache);
- ``forward`` and ``backward``: one stage of ``throughput.py``'s MLP (8 Linear(512, 512) and
  ReLU, 64 rows), as a 2-stage pipeline's stage computes them;
- ``step``: torch's SGD with momentum stepping that stage's 8.0 MiB of weights (weights,
  gradients and momentum: 24 MiB moved in and 16 MiB out per step).

The plan's cost model times the optimizer step (:mod:`pipeoptim.update_cost`) and profiles
the stages (:mod:`pipeoptim.compiler.profile`) in one process with the other cores idle; a
pipeline's ranks run at once. Where ``together / alone`` is above 1 the plan under-prices
that part (``benchmarks/results/breakdown.md``: the stages' weight policies and steps took
1.17 to 1.58 times their figure in the workers).

    python benchmarks/memory_sharing.py [--quick] [--rounds 5] [--out DIR]

Writes ``memory_sharing.md`` into ``--out``: ``benchmarks/results`` for the full run, a new
temporary folder for ``--quick`` or other ``--rounds``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from outputs import OUT_HELP, host, results_dir, run_kind, write_result

from pipeoptim.runtime.spawning import run_processes, worker_context

PARTS = ("compute", "stream", "forward", "backward", "step")
STREAM_BYTES = 64 << 20


def workload(part: str) -> tuple[Callable[[], object], Callable[[], object]]:
    """``(untimed, timed)``: the two calls of one repetition of ``part`` (module docstring),
    built once per process; ``untimed`` prepares what ``timed`` needs (the forward a backward
    runs on) and does nothing for the other parts."""
    if part == "compute":
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        return lambda: None, lambda: torch.mm(a, b)
    if part == "stream":
        src, dst = torch.randn(STREAM_BYTES // 4), torch.empty(STREAM_BYTES // 4)
        return lambda: None, lambda: dst.copy_(src)
    stage = nn.Sequential(*[layer for _ in range(8) for layer in (nn.Linear(512, 512), nn.ReLU())])
    x = torch.randn(64, 512)
    if part == "forward":
        return lambda: None, lambda: stage(x)
    optimizer = torch.optim.SGD(stage.parameters(), lr=1e-3, momentum=0.9)
    stage(x).sum().backward()
    if part == "step":
        return lambda: None, optimizer.step
    out: list[torch.Tensor] = []
    return lambda: out.append(stage(x).sum()), lambda: out.pop().backward()


def _run(part: str, core: int, seconds: float, start: object, results: object) -> None:
    """In a process bound to ``core``: repeat ``part`` from ``start`` (a barrier) until its
    timed calls add up to ``seconds``; put ``(core, their mean seconds)`` on ``results`` (the
    mean, not the median: repetitions that overlap another core's are the slow ones, and a
    median of repetitions hid a copy slowed 1.5x)."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    untimed, timed = workload(part)
    for _ in range(3):
        untimed()
        timed()
    total, count = 0.0, 0
    start.wait()  # type: ignore[attr-defined]
    while total < seconds:
        untimed()
        began = time.perf_counter()
        timed()
        total += time.perf_counter() - began
        count += 1
    results.put((core, total / count))  # type: ignore[attr-defined]


def measure(part: str, cores: list[int], seconds: float) -> float:
    """Mean seconds per repetition of ``part`` in processes bound to ``cores``, run at once
    (the median over the processes), each started from a server that imported torch once
    (:func:`pipeoptim.runtime.spawning.run_processes`).

    Raises:
        RuntimeError: a process exited with an error, or the run took over 2 minutes more
            than ``seconds``."""
    context = worker_context()
    start = context.Barrier(len(cores))
    args = [(part, core, seconds, start) for core in cores]
    times = run_processes(_run, args, f"{part} on cores {cores}", timeout=120 + seconds, context=context)
    return statistics.median(times.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round (unless --rounds) of shorter runs")
    parser.add_argument("--rounds", type=int, default=5, help="alone/together pairs per part (default 5)")
    parser.add_argument("--out", type=Path, help=OUT_HELP)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        parser.error("needs at least 2 usable cores: ranks sharing a CPU is what it measures")
    kind = run_kind(parser, args, ("rounds",))
    out = results_dir(parser, args, "memory_sharing", scope=("rounds",))
    rounds = 1 if args.quick and args.rounds == parser.get_default("rounds") else args.rounds  # given: kept
    seconds = 0.25 if args.quick else 2.0
    rows, summary = [], []
    for part in PARTS:
        alone, together = [], []
        for _ in range(rounds):
            alone.append(measure(part, cores[:1], seconds))
            together.append(measure(part, cores, seconds))
        a, t = statistics.median(alone), statistics.median(together)
        ratios = sorted(y / x for x, y in zip(alone, together))
        rows.append(
            [part, f"{a * 1e3:.3f}", f"{t * 1e3:.3f}", f"{t / a:.2f}", f"{ratios[0]:.2f}-{ratios[-1]:.2f}"]
        )
        summary.append(f"{part} {t / a:.2f}x")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stream_gb = [STREAM_BYTES * 2 / float(r[i]) / 1e6 for r in rows if r[0] == "stream" for i in (1, 2)]
    text = (
        f"# Ranks sharing one CPU: each part alone on one core and on all {len(cores)} at once "
        f"({kind} run, {when}, {host()})\n\n"
        f"One process per core, one thread each, {rounds} round(s) of {seconds:g} s per run, alone "
        "and together taking turns; ms are the medians over rounds of the mean time per repetition "
        f"(over the processes together), `range` that of the rounds' ratios. The 64 MiB copy moved "
        f"{stream_gb[0]:.1f} GB/s alone and {stream_gb[1]:.1f} GB/s per core together.\n\n"
        + tabulate(
            rows,
            headers=["part", "alone ms", "together ms", "together / alone", "range"],
            tablefmt="github",
            disable_numparse=True,
            colalign=("left", "right", "right", "right", "right"),
        )
        + "\n"
    )
    print(text)
    print(f"ranks on all {len(cores)} cores at once / alone: {', '.join(summary)}")
    write_result(out / "memory_sharing.md", text)
    print(f"results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
