"""Layouts of 4 ranks measured against the layout planner's predictions (CPU, gloo).

4 stages × 1, 2 stages × 2 replicas, 1 stage × 4 replicas, and the planner's choice if it is
another.

For one model (a deep MLP) and one method, measured side by side in one run: steady-state
mini-batches per second of each layout with one worker process per rank, against the
throughput the layout planner predicts, and the layout it chooses among every layout of 4
devices. The gloo link's latency α and inverse bandwidth β and the all-reduce's fixed cost and
bandwidth are measured first (:func:`pipeoptim.runtime.linkcost.measure_link` and
:func:`~pipeoptim.runtime.linkcost.measure_allreduce`; ``--quick`` takes the figures ``compile``
uses, :func:`pipeoptim.machine_costs.load_or_measure_machine_costs`) and given to the planner
and to ``compile``; the planner (:func:`pipeoptim.compile_layout.plan_best_layout`) plans each
layout as ``compile`` does (its own micro-batch's profile, the cores the ranks share), so
its prediction for a layout is the compiled plan's.

    python benchmarks/layouts.py [--quick] [--method pipeoptim] [--out DIR]

``--quick`` writes to a new temporary folder unless ``--out`` says otherwise; only the full
run writes ``benchmarks/results/layouts.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from outputs import OUT_HELP, parse_rank_args, results_dir, run_kind, write_result
from tabulate import tabulate
from torch import nn

import pipeoptim
from pipeoptim.action_overhead import measure_action_overhead
from pipeoptim.compile_layout import plan_best_layout
from pipeoptim.machine_costs import MachineCosts, load_or_measure_machine_costs
from pipeoptim.runtime.linkcost import measure_allreduce, measure_link

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


def compile_options(method: str, x: torch.Tensor, costs: MachineCosts, profile_dir: Path) -> dict[str, Any]:
    """``compile``'s keyword arguments for every layout (and for the planner): this machine's
    link, all-reduce and runtime figures, under ``compile``'s names (priced as the link, the
    all-reduce left 2 x 2 and 1 x 4 at 0.59 and 0.49 of their prediction; left at compile's 0,
    the runtime's seconds per action missed 0.37 ms of 12 actions a mini-batch at 4 stages,
    helper-140)."""
    return dict(
        **costs._asdict(),
        example_inputs=x,
        loss_fn=F.cross_entropy,
        method=method,
        executor="processes",
        profile_dir=profile_dir,
    )


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def run_layout(
    stages: int,
    replicas: int,
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    warmup: int,
    steps: int,
    options: dict[str, Any],
) -> dict[str, float]:
    with pipeoptim.compile(
        model, optimizer(model), stages * replicas, data_parallel=replicas, **options
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
    parser.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    args = parse_rank_args(parser)
    args.out = results_dir(parser, args, "layouts", scope=("method",))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    width, depth, rows = (128, 4, 32) if args.quick else (512, 16, 64)
    warmup, steps = (2, 6) if args.quick else (5, 200)  # 40 (0.7 s) read 32-61/s for one layout
    profile_dir = args.out / ".profiles"
    model = make_model(width, depth)
    data = batch(width, rows)
    load = os.getloadavg()
    if args.quick:  # compile's figures (measured once, robustly, and cached): a quick fit of
        # the link on a busy machine can fail three times ("send times do not grow")
        costs = load_or_measure_machine_costs(log=lambda message: print(message, file=sys.stderr))
    else:
        (latency, beta), (fixed, ring) = measure_link(), measure_allreduce()
        costs = MachineCosts(latency, 1 / beta, measure_action_overhead(), ring, fixed)
    how = "this machine's figures, as `compile` takes them" if args.quick else "measured"
    options = compile_options(args.method, data[0], costs, profile_dir)
    choice = plan_best_layout(model, optimizer(model), 4, **options)
    planned = {(o.stages, o.replicas): o for o in choice.options}
    chosen = (choice.chosen.stages, choice.chosen.replicas)
    layouts = LAYOUTS + ([chosen] if chosen not in LAYOUTS else [])  # the choice is measured too
    measured = {}
    for n, r in layouts:
        print(f"running {n} stages x {r} replicas", file=sys.stderr)
        measured[(n, r)] = run_layout(n, r, model, data, warmup, steps, options)
    best = max(layouts, key=lambda layout: measured[layout]["measured"])
    rows_out = []
    for layout in layouts:
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
        verdict = f"The planner chooses {chosen[0]} x {chosen[1]}, the measured best of the {len(layouts)}."
    else:
        verdict = (
            f"The planner chooses {chosen[0]} x {chosen[1]}, the measured best is {best[0]} x {best[1]}: "
            "the measured / predicted column says which layouts the cost model over- or underrates "
            f"(profiles and runs share {cores} cores with whatever else the machine ran)."
        )
    text = "\n".join(
        [
            f"# Layouts of 4 ranks ({run_kind(parser, args, ('method',))} run, CPU, gloo, 1 thread per rank, "
            f"{cores} cores)",
            "",
            f"MLP of {depth} linear layers of width {width}, mini-batches of {rows} rows, method "
            f"`{args.method}`, SGD with momentum, {steps} timed mini-batches after {warmup} of warm-up, "
            f"gloo link α = {costs.latency * 1e6:.0f} µs, 1/β = {costs.bandwidth / 1e9:.2f} GB/s, all-reduce "
            f"{costs.allreduce_latency * 1e6:.0f} µs each and {costs.allreduce_bandwidth / 1e9:.2f} GB/s and "
            f"the runtime's {costs.action_overhead * 1e3:.3f} ms per action ({how}, given to the planner "
            "and to `compile`), "
            "load average "
            f"{load[0]:.1f} before and {os.getloadavg()[0]:.1f} after. *planner predicts*: "
            '`pipeoptim.compile_layout.plan_best_layout` (what `compile(..., data_parallel="auto")` '
            "and `pipeoptim train --gpus 4` choose from), each layout planned from a profile of its own "
            "micro-batch with the link, update costs and shared cores `compile` uses; *compile's plan*: "
            "the plan `compile` made when asked for that layout (the same figure, from the same cached "
            "profiles).",
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
    write_result(args.out / "layouts.md", text)
    print(f"results in {args.out}", file=sys.stderr)
    summary = ", ".join(f"{n}x{r} {measured[(n, r)]['measured']:.1f}/s" for n, r in layouts)
    print(f"{summary}; planner chose {chosen[0]}x{chosen[1]}, measured best {best[0]}x{best[1]}")


if __name__ == "__main__":
    main()
