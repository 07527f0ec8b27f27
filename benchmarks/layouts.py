"""Layouts of 4 ranks: 4 stages × 1, 2 stages × 2 replicas, 1 stage × 4 replicas (CPU, gloo).

For one model (a deep MLP) and one method, measured side by side in one run: steady-state
mini-batches per second of each layout with one worker process per rank, against the
throughput the layout planner (:mod:`pipeoptim.compiler.layouts`) predicts, and the layout it
chooses among every layout of 4 devices. The loopback bandwidth is measured first and given
to the planner and to ``compile``.

    python benchmarks/layouts.py [--quick] [--method pipeoptim] [--out DIR]

``--quick`` writes to a new temporary folder unless ``--out`` says otherwise; only the full
run writes ``benchmarks/results/layouts.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import pipeoptim
from pipeoptim.compiler import profile_model
from pipeoptim.compiler.costmodel import CostConfig, optimizer_state_factor
from pipeoptim.compiler.layouts import LayoutChoice, choose_layout
from pipeoptim.fileio import atomic_write
from pipeoptim.methods import get_method
from pipeoptim.runtime.distributed import free_port
from pipeoptim.update_cost import load_or_measure_update_cost

CLASSES = 10
LAYOUTS = [(4, 1), (2, 2), (1, 4)]


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, CLASSES))


def batch(width: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(size, width, generator=g), torch.randint(0, CLASSES, (size,), generator=g)


def _ping(rank: int, port: int, size: int, repeats: int, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    x = torch.zeros(size // 4)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        if rank == 0:
            dist.send(x, 1)
        else:
            dist.recv(x, 0)
    dist.barrier()
    if rank == 1:
        out.put(size * repeats / (time.perf_counter() - start))
    dist.destroy_process_group()


def measure_bandwidth() -> float:
    """Bytes per second of a gloo send between two processes on this machine."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ping, args=(r, port, 16 << 20, 10, out)) for r in range(2)]
    for p in procs:
        p.start()
    value = out.get(timeout=120)
    for p in procs:
        p.join(30)
    return value


def plan_layouts(
    model: nn.Module, x: torch.Tensor, method: str, bandwidth: float, profile_dir: Path
) -> LayoutChoice:
    """The planner's view: every layout of 4 devices, from one profile of the mini-batch."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step, predict = load_or_measure_update_cost(torch.optim.SGD, opt.defaults, "cpu", profile_dir=profile_dir)
    micro = 4 if get_method(method).micro_batched else 1  # as compile splits it for 4 stages
    graph, _ = profile_model(model, (x[: x.shape[0] // micro],), profile_dir=profile_dir)
    config = CostConfig(
        4,
        method=method,
        micro_batches=micro,
        bandwidth=bandwidth,
        opt_state_factor=optimizer_state_factor(opt),
        step_s_per_byte=step,
        predict_s_per_byte=predict,
    )
    return choose_layout(graph, config, 4)


def run_layout(
    stages: int,
    replicas: int,
    method: str,
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    warmup: int,
    steps: int,
    bandwidth: float,
    profile_dir: Path,
) -> dict[str, float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with pipeoptim.compile(
        model,
        opt,
        stages * replicas,
        data_parallel=replicas,
        example_inputs=data[0],
        loss_fn=F.cross_entropy,
        method=method,
        executor="processes",
        profile_dir=profile_dir,
        bandwidth=bandwidth,
    ) as pipe:
        for _ in range(warmup):
            pipe.step(*data)
        pipe.flush()
        start = time.perf_counter()
        for _ in range(steps):
            pipe.step(*data)
        pipe.flush()
        elapsed = time.perf_counter() - start
        predicted = pipe.plan.summary["throughput_per_s"]
    return {"measured": steps / elapsed, "compiled_plan": predicted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller MLP and fewer steps (about a minute)")
    parser.add_argument("--method", default="pipeoptim", choices=list(pipeoptim.METHODS))
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: see above)")
    args = parser.parse_args()
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix="layouts-")) if args.quick else Path(__file__).parent / "results"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    width, depth, rows = (128, 4, 32) if args.quick else (512, 16, 64)
    warmup, steps = (2, 6) if args.quick else (5, 40)
    profile_dir = args.out / ".profiles"
    model = make_model(width, depth)
    data = batch(width, rows)
    bandwidth = measure_bandwidth()
    choice = plan_layouts(model, data[0], args.method, bandwidth, profile_dir)
    planned = {(o.stages, o.replicas): o for o in choice.options}
    measured = {}
    for n, r in LAYOUTS:
        print(f"running {n} stages x {r} replicas", file=sys.stderr)
        measured[(n, r)] = run_layout(n, r, args.method, model, data, warmup, steps, bandwidth, profile_dir)
    best = max(LAYOUTS, key=lambda layout: measured[layout]["measured"])
    chosen = (choice.chosen.stages, choice.chosen.replicas)
    rows_out = []
    for layout in LAYOUTS:
        predicted = planned[layout].throughput_per_s
        got = measured[layout]["measured"]
        rows_out.append(
            [
                f"{layout[0]} x {layout[1]}",
                f"{predicted:.2f}",
                f"{measured[layout]['compiled_plan']:.2f}",
                f"{got:.2f}",
                f"{got / predicted:.2f}",
                ("chosen " if layout == chosen else "") + ("measured best" if layout == best else ""),
            ]
        )
    headers = ["stages x replicas", "planner predicts /s", "compile's plan /s", "measured /s"]
    headers += ["measured / predicted", ""]
    cores = os.cpu_count() or 1
    if chosen == best:
        verdict = f"The planner chooses {chosen[0]} x {chosen[1]}, the measured best of the three."
    elif chosen not in LAYOUTS:
        verdict = (
            f"The planner chooses {chosen[0]} x {chosen[1]} (not measured here: it uses fewer than 4 "
            f"ranks); of the three measured, {best[0]} x {best[1]} is fastest."
        )
    else:
        verdict = (
            f"The planner chooses {chosen[0]} x {chosen[1]}, the measured best is {best[0]} x {best[1]}: "
            "the cost model gives every rank a device of its own, here 4 ranks "
            f"share {cores} cores, so every layout runs at most {cores} ranks' work at a time and the "
            "layouts' measured rates are closer than predicted (the measured / predicted column)."
        )
    text = "\n".join(
        [
            f"# Layouts of 4 ranks ({'quick' if args.quick else 'full'} run, CPU, gloo, 1 thread per rank, "
            f"{cores} cores)",
            "",
            f"MLP of {depth} linear layers of width {width}, mini-batches of {rows} rows, method "
            f"`{args.method}`, SGD with momentum, {steps} timed mini-batches after {warmup} of warm-up, "
            f"loopback bandwidth {bandwidth / 1e9:.2f} GB/s (measured, given to the planner and to "
            "`compile`). *planner predicts*: `pipeoptim.compiler.layouts.choose_layout` from one profile "
            "of the mini-batch (rows per micro-batch scaled linearly); *compile's plan*: the plan "
            "`compile` made for that layout from a profile of its own micro-batch.",
            "",
            tabulate(rows_out, headers=headers, tablefmt="github"),
            "",
            verdict,
            "",
            "Every layout the planner considered (best first):",
            "",
            "```",
            choice.table(),
            "```",
            "",
        ]
    )
    atomic_write(args.out / "layouts.md", lambda f: f.write(text.encode()))
    print(f"results in {args.out}", file=sys.stderr)
    summary = ", ".join(f"{n}x{r} {measured[(n, r)]['measured']:.1f}/s" for n, r in LAYOUTS)
    print(f"{summary}; planner chose {chosen[0]}x{chosen[1]}, measured best {best[0]}x{best[1]}")


if __name__ == "__main__":
    main()
