"""Pipeline throughput on CPU (gloo, one thread per rank), measured side by side in one run.

For 2 and 4 stages: steady-state mini-batches per second of every pipeoptim method, and of
``torch.distributed.pipelining``'s ``ScheduleGPipe`` and ``Schedule1F1B`` driving the very same
stage modules (same plan, same micro-batch size), as ratios to the best; the plan's predicted
throughput against the measured one (the cost model's accuracy, with the loopback bandwidth
measured first); the measured bubble (idle share of the stages' time, from recorded action
timestamps); and the measured peak memory per stage -- weights (all versions kept),
optimizer state, saved activations -- for PipeOptim against PipeDream's weight stashing.
A timeline picture shows when each stage ran which forward and backward.

    python benchmarks/throughput.py [--quick] [--stages 2 4] [--methods 2bw ...] [--out DIR]

``--quick`` and runs of some stage counts or methods write to a new temporary folder unless
``--out`` says otherwise; only the full run writes ``benchmarks/results``.

Writes ``throughput.md``, ``throughput_timeline.png`` and ``throughput_memory.png``.
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
from pipeoptim.compiler.codegen import stage_module
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.trace import trace
from pipeoptim.runtime.distributed import free_port

WIDTH, DEPTH, BATCH, CLASSES = 512, 16, 64, 10


def make_model() -> nn.Module:
    """A deep MLP: every stage boundary carries one [BATCH, WIDTH] activation."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))


def batch(seed: int = 0, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, WIDTH, generator=g), torch.randint(0, CLASSES, (size,), generator=g)


# ------------------------------------------------------------------ loopback bandwidth


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


# ------------------------------------------------------------------------ pipeoptim


def compile_mlp(
    method: str, stages: int, executor: str, profile_dir: Path, size: int = BATCH, **options: Any
) -> pipeoptim.Pipeline:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=batch(size=size)[0],
        loss_fn=F.cross_entropy,
        method=method,
        executor=executor,
        profile_dir=profile_dir,
        **options,
    )


def run_pipeoptim(
    method: str, stages: int, micro: int, warmup: int, steps: int, profile_dir: Path, bandwidth: float
) -> dict[str, Any]:
    # PipeDream-2BW steps once per M micro-batches of BATCH rows each: its micro-batch is the
    # unit the other asynchronous methods run per pass, so it gets mini-batches of M x BATCH
    # rows and its rate is counted per BATCH rows, like theirs (same work per pass).
    scale = micro if method == "2bw" else 1
    x, y = batch(size=BATCH * scale)
    micro_batches = micro if method in ("gpipe", "1f1b", "2bw") else None
    with compile_mlp(
        method,
        stages,
        "processes",
        profile_dir,
        size=BATCH * scale,
        micro_batches=micro_batches,
        bandwidth=bandwidth,
    ) as pipe:
        for _ in range(warmup):
            pipe.step(x, y)
        pipe.flush()
        start = time.perf_counter()
        for _ in range(steps):
            pipe.step(x, y)
        pipe.flush()
        end = time.perf_counter()
        timeline = pipe._executor.timeline()
        summary = pipe.plan.summary
        plan = pipe.plan
    busy = sum(t1 - t0 for acts in timeline for _, _, t0, t1 in acts if t0 >= start)
    return {
        "rate": steps * scale / (end - start),
        "predicted": summary["throughput_per_s"] * scale,
        "bubble": 1 - busy / (stages * (end - start)),
        "predicted_bubble": summary["bubble_fraction"],
        "timeline": timeline,
        "start": start,
        "plan": plan,
    }


# ------------------------------------------------- torch.distributed.pipelining reference


class _Last(nn.Module):
    """The last stage returns its one output tensor, as the pipelining loss expects."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)[0]


def _pippy_worker(
    rank: int,
    world: int,
    port: int,
    plan_dict: dict,
    schedule: str,
    micro: int,
    warmup: int,
    steps: int,
    out: Any,
) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    model = make_model()
    x, y = batch()
    micro_x = x[: BATCH // micro]
    plan = Plan.from_dict(plan_dict)
    module: nn.Module = stage_module(trace(model, (micro_x,)), plan, rank)
    if rank == world - 1:
        module = _Last(module)
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    cls = {"ScheduleGPipe": ScheduleGPipe, "Schedule1F1B": Schedule1F1B}[schedule]
    sched = cls(stage, n_microbatches=micro, loss_fn=F.cross_entropy)
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def one_step() -> None:
        opt.zero_grad()
        if rank == 0:
            sched.step(x)
        elif rank == world - 1:
            sched.step(target=y, losses=[])
        else:
            sched.step()
        opt.step()

    for _ in range(warmup):
        one_step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    dist.barrier()
    if rank == 0:
        out.put(steps / (time.perf_counter() - start))
    dist.destroy_process_group()


def run_pippy(schedule: str, plan: Plan, micro: int, warmup: int, steps: int) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    world = plan.num_stages
    procs = [
        ctx.Process(
            target=_pippy_worker, args=(r, world, port, plan.to_dict(), schedule, micro, warmup, steps, out)
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    value = out.get(timeout=600)
    for p in procs:
        p.join(60)
    return value


# --------------------------------------------------------------------------- memory


def measure_memory(method: str, stages: int, steps: int, profile_dir: Path) -> list[dict[str, int]]:
    """Per-stage peak weights / optimizer state / activations, with the local executor (same schedule)."""
    with compile_mlp(method, stages, "local", profile_dir) as pipe:
        for stage in pipe._executor.stages:
            stage.measure_memory = True
        for i in range(steps):
            pipe.step(*batch(i))
        pipe.flush()
        return [stage.memory_report() for stage in pipe._executor.stages]


# --------------------------------------------------------------------------- output


def plot_timeline(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline, start = result["timeline"], result["start"]
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(timeline) + 1.5))
    colors = {"F": "tab:blue", "B": "tab:orange", "S": "tab:green"}
    for k, acts in enumerate(timeline):
        for op in "FBS":
            bars = [((t0 - start) * 1e3, (t1 - t0) * 1e3) for o, _, t0, t1 in acts if o == op and t0 >= start]
            ax.broken_barh(bars, (k - 0.4, 0.8), color=colors[op], label=op if k == 0 else None)
    ax.set(
        yticks=range(len(timeline)),
        yticklabels=[f"stage {k}" for k in range(len(timeline))],
        xlabel="ms",
        title=title,
    )
    ax.invert_yaxis()
    ax.legend(loc="upper right", labels=["forward", "backward", "optimizer step"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_memory(reports: dict[str, list[dict[str, int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(reports)
    for i, (method, stages) in enumerate(reports.items()):
        xs = [k + i * width for k in range(len(stages))]
        bottom = [0.0] * len(stages)
        for part, hatch in (
            ("weight_bytes", ""),
            ("optimizer_state_bytes", "//"),
            ("activation_bytes", ".."),
        ):
            values = [s[part] / 2**20 for s in stages]
            ax.bar(
                xs,
                values,
                width,
                bottom=bottom,
                hatch=hatch,
                color=f"C{i}",
                edgecolor="black",
                label=f"{method}: {part.replace('_bytes', '').replace('_', ' ')}",
            )
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="stage", ylabel="MiB (measured peak)", title="memory per stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 stages, fewer methods and steps (under 2 minutes)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write (default: benchmarks/results for the full run, a new temporary "
        "folder for --quick, --stages or --methods)",
    )
    parser.add_argument("--stages", type=int, nargs="+", help="stage counts to measure (default 2 4)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(pipeoptim.METHODS),
        help="measure only these methods (pipeoptim and pipedream always run: the summary compares them)",
    )
    args = parser.parse_args()
    partial = args.quick or args.stages is not None or args.methods is not None
    if args.out is None and partial:
        args.out = Path(tempfile.mkdtemp(prefix="throughput-"))
    elif args.out is None:
        args.out = Path(__file__).parent / "results"
    args.stages = args.stages or [2, 4]
    torch.set_num_threads(1)  # profile as the ranks run: one thread each
    stage_counts = [2] if args.quick else args.stages
    methods = ["pipeoptim", "pipedream", "1f1b"] if args.quick else list(pipeoptim.METHODS)
    if args.methods and not args.quick:
        extra = [m for m in args.methods if m not in ("pipeoptim", "pipedream")]
        methods = ["pipeoptim", "pipedream", *extra]
    warmup, steps = (2, 6) if args.quick else (5, 30)
    profile_dir = args.out / ".profiles"
    print("measuring the loopback bandwidth ...", file=sys.stderr)
    bandwidth = measure_bandwidth()
    rows, timeline_result = [], None
    for n in stage_counts:
        micro = n
        results: dict[str, dict[str, Any]] = {}
        for method in methods:
            print(f"  {n} stages, {method} ...", file=sys.stderr)
            results[method] = run_pipeoptim(method, n, micro, warmup, steps, profile_dir, bandwidth)
        plan = results["1f1b"]["plan"] if "1f1b" in results else results[methods[0]]["plan"]
        for schedule in ("ScheduleGPipe", "Schedule1F1B"):
            print(f"  {n} stages, torch.distributed.pipelining {schedule} ...", file=sys.stderr)
            results[f"pipelining {schedule}"] = {"rate": run_pippy(schedule, plan, micro, warmup, steps)}
        best = max(r["rate"] for r in results.values())
        for name, r in results.items():
            rows.append(
                [
                    n,
                    name,
                    f"{r['rate']:.2f}",
                    f"{r['rate'] / best:.2f}",
                    f"{r['predicted']:.2f}" if "predicted" in r else "-",
                    f"{r['rate'] / r['predicted']:.2f}" if "predicted" in r else "-",
                    f"{r['bubble']:.0%}" if "bubble" in r else "-",
                    f"{r['predicted_bubble']:.0%}" if "predicted_bubble" in r else "-",
                ]
            )
        timeline_result = (n, results["pipeoptim"])
    headers = [
        "stages",
        "method",
        "mini-batches/s",
        "vs best",
        "predicted /s",
        "measured / predicted",
        "bubble",
        "predicted bubble",
    ]
    table = tabulate(rows, headers=headers, tablefmt="github")
    print(table)
    memory_stages = stage_counts[-1] if args.quick else 4
    memory_methods = ["pipeoptim", "pipedream"] + (["2bw"] if "2bw" in methods else [])
    reports = {m: measure_memory(m, memory_stages, 12, profile_dir) for m in memory_methods}
    mem_rows = [
        [
            m,
            k,
            r["weight_versions"],
            f"{r['weight_bytes'] / 2**20:.2f}",
            f"{r['optimizer_state_bytes'] / 2**20:.2f}",
            f"{r['activation_bytes'] / 2**20:.2f}",
            f"{(r['weight_bytes'] + r['optimizer_state_bytes'] + r['activation_bytes']) / 2**20:.2f}",
        ]
        for m, stages in reports.items()
        for k, r in enumerate(stages)
    ]
    mem_table = tabulate(
        mem_rows,
        headers=[
            "method",
            "stage",
            "weight versions",
            "weights MiB",
            "optimizer state MiB",
            "activations MiB",
            "total MiB",
        ],
        tablefmt="github",
    )
    print(mem_table)
    args.out.mkdir(parents=True, exist_ok=True)
    n, result = timeline_result
    plot_timeline(result, args.out / "throughput_timeline.png", f"pipeoptim, {n} stages, CPU gloo")
    plot_memory(reports, args.out / "throughput_memory.png")
    rates = {r[1]: float(r[2]) for r in rows if r[0] == stage_counts[-1]}
    ours = rates["pipeoptim"]
    weights = {m: sum(s["weight_bytes"] for s in stages) for m, stages in reports.items()}
    summary = (
        f"{stage_counts[-1]} stages: pipeoptim {ours:.2f} mini-batches/s = "
        f"{ours / rates['pipelining ScheduleGPipe']:.2f}x pipelining GPipe, "
        f"{ours / rates['pipelining Schedule1F1B']:.2f}x pipelining 1F1B, "
        f"{ours / rates['pipedream']:.2f}x pipedream; weight memory pipeoptim/pipedream "
        f"{weights['pipeoptim'] / weights['pipedream']:.2f}x; loopback bandwidth {bandwidth / 1e9:.2f} GB/s"
    )
    (args.out / "throughput.md").write_text(
        f"# Throughput ({'quick' if args.quick else 'full'} run, CPU, gloo, 1 thread per rank, "
        f"{os.cpu_count()} cores)\n\nModel: MLP {DEPTH}x{WIDTH}, mini-batch {BATCH}; micro-batches = "
        f"stages for gpipe, 1f1b and torch.distributed.pipelining; 2bw runs mini-batches of "
        f"stages x {BATCH} rows in micro-batches of {BATCH} (the rows other asynchronous methods run "
        f"per pass) and its rates count {BATCH} rows as one mini-batch; {steps} timed mini-batches "
        f"after {warmup}.\n\n{table}\n\n## Peak memory per stage ({memory_stages} stages, measured)"
        f"\n\n{mem_table}\n\n{summary}\n"
    )
    print(summary)
    print(f"results in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
