"""Where the time goes: per stage and method, the time of each part of the actions.

Runs every method's stages as gloo ranks on this machine (one thread each, the runtime's own
``StageProcess`` as a worker runs it) with :func:`pipeoptim.runtime.action_timer.instrument`
around them, and prints per stage the milliseconds per mini-batch of forward and backward
compute, the weight policy (prediction, stash or shadow copies), the optimizer step, the
wait for received values, posting and retiring sends, and the Python overhead of the action
loop (per action in microseconds). It also times the saved-tensor hooks that redirect the
backward to other weights: forward+backward of stage 0 with and without them.

    python benchmarks/breakdown.py [--quick] [--model mlp] [--stages 4] [--methods pipeoptim ...]
                                   [--clock wall|cpu] [--out DIR]

``--clock cpu`` times each part in CPU time of the stage's thread (``time.thread_time``)
instead of wall time: where ranks share cores, a part's wall time includes the other rank's
turns, and its CPU time does not (nor the waits, nor gloo's threads), so the parts of two
methods compare as work done.

Writes ``breakdown.md`` (with the machine load while it ran) into ``--out``: by default
``benchmarks/results`` for the full run and a new temporary folder for ``--quick`` or a run of
other ``--model``, ``--stages`` or ``--methods``.
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
from tabulate import tabulate

from pipeoptim.microbatch import Rows, scales, sizes, split
from pipeoptim.runtime.action_timer import PARTS, instrument
from pipeoptim.runtime.affinity import pin_rank
from pipeoptim.runtime.build import PipelineSpec
from pipeoptim.runtime.executor import MiniBatch
from pipeoptim.runtime.spawning import pickle_spec, unpickle_spec

sys.path.insert(0, str(Path(__file__).parent))
from outputs import OUT_HELP, host, parse_rank_args, results_dir, run_kind, stage_count, write_result
from throughput import MODELS, compile_model, run_ranks

METHODS = ("pipeoptim", "pipedream", "2bw", "spectrain", "none", "1f1b")
#: what ``--clock`` times each part with, and how the report names it
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
CLOCK_WORDS = {"wall": "wall time", "cpu": "CPU time of the stage's thread"}


def mini_batch(spec: PipelineSpec, model: str, index: int, rank: int, rows: int) -> MiniBatch:
    """Mini-batch ``index`` of ``model``'s data as the driver would hand it to stage ``rank``."""
    x, y = MODELS[model][1](index, rows)
    m = spec.micro_batches
    parts = [Rows(n) for n in sizes(rows, m)]
    last = rank == spec.num_stages - 1
    return MiniBatch(
        index=index,
        inputs=split((x,), m) if rank == 0 else [],
        targets=split(y, m) if last else [],
        scales=scales(parts, spec.loss_reduction),
        sizes=parts,
        hyper=spec.hyper,
    )


def _rank(
    rank: int,
    world: int,
    port: int,
    payload: bytes,
    model: str,
    rows: int,
    warmup: int,
    steps: int,
    clock: str,
    out: Any,
) -> None:

    from pipeoptim.runtime.worker import StageProcess

    torch.set_num_threads(1)
    pin_rank(rank, world)  # as a worker binds itself (pipeoptim.runtime.affinity)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    spec = unpickle_spec(payload)
    process = StageProcess(spec, rank, torch.device("cpu"), 300.0)
    timer = instrument(process, CLOCKS[clock])
    for i in range(warmup):
        process.submit(mini_batch(spec, model, i, rank, rows))
    dist.barrier()
    timer.reset()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        process.submit(mini_batch(spec, model, i, rank, rows))
    process.flush()
    elapsed = time.perf_counter() - start
    out.put((rank, (timer.breakdown(), timer.actions, elapsed)))
    dist.barrier()
    dist.destroy_process_group()


def measure(
    model: str, method: str, stages: int, warmup: int, steps: int, profile_dir: Path, clock: str = "wall"
) -> list[dict[str, Any]]:
    """Per stage: seconds per part, actions run, the wall time of the timed mini-batches, and
    the plan's profiled seconds per mini-batch of forward, backward and weight work (policy
    and optimizer step), from a profile taken just before (a new ``profile_dir`` per call)."""
    micro = stages if method in ("1f1b", "gpipe", "2bw") else None
    batch = MODELS[model][3]
    rows = batch * stages if method == "2bw" else batch  # 2BW's micro-batch is the others' pass
    with compile_model(model, method, stages, "local", profile_dir, rows, micro_batches=micro) as pipe:
        payload = pickle_spec(pipe.spec)
        per_rows = stages if method == "1f1b" else 1  # plan costs are per micro-batch
        profiled = [
            {
                "forward": s.fwd_s * per_rows,
                "backward": s.bwd_s * per_rows,
                "weights+step": s.update_s * per_rows,
            }
            for s in pipe.plan.stages
        ]
    ranks = run_ranks(_rank, stages, (payload, model, rows, warmup, steps, clock), f"{method} on {model}")
    scale = stages if method == "2bw" else 1  # per mini-batch of the others' rows
    return [
        {"parts": parts, "actions": actions, "elapsed": elapsed, "mini_batches": steps * scale, "profiled": p}
        for (parts, actions, elapsed), p in zip((ranks[r] for r in range(stages)), profiled)
    ]


def hook_cost(model: str, repeats: int, profile_dir: Path) -> tuple[float, float]:
    """Milliseconds of forward+backward of stage 0 of 2 without and with the saved-tensor
    hooks that redirect the backward (medians of ``repeats``)."""
    _, data, _, rows, _ = MODELS[model]
    with compile_model(model, "none", 2, "local", profile_dir, rows) as pipe:
        stage = pipe._executor.stages[0]
        x = data()[0]

        def once(hooked: bool) -> float:
            start = time.perf_counter()
            if hooked:
                with stage.policy.saving(0):
                    out = stage.module(x)
            else:
                out = stage.module(x)
            torch.autograd.backward([t.sum() for t in out if isinstance(t, torch.Tensor)])
            return time.perf_counter() - start

        plain, hooked = [], []
        for _ in range(repeats):  # interleaved: both see the same load
            plain.append(once(False))
            hooked.append(once(True))
    return 1e3 * sorted(plain)[len(plain) // 2], 1e3 * sorted(hooked)[len(hooked) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few mini-batches; by default 2 stages and 2 methods (--stages and --methods still apply)",
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--stages", type=stage_count, help="default 4 (2 with --quick)")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: wall time per part (default); cpu: CPU time of each stage's thread",
    )
    parser.add_argument("--out", type=Path, help=OUT_HELP)
    args = parse_rank_args(parser)
    stages = args.stages or (2 if args.quick else 4)
    if stages > MODELS[args.model][3]:  # refused as throughput.py does (a traceback before, helper-152)
        parser.error(
            f"--stages {stages}: {args.model}'s mini-batch of {MODELS[args.model][3]} rows cannot be "
            "split into that many micro-batches"
        )
    scope = {"model": "mlp", "stages": 4, "methods": list(METHODS), "clock": "wall"}
    kind = run_kind(parser, args, scope)
    args.out = results_dir(parser, args, "breakdown", scope=scope)
    torch.set_num_threads(1)
    methods = args.methods or (["pipeoptim", "pipedream"] if args.quick else list(METHODS))
    warmup, steps = (2, 4) if args.quick else (5, 30)
    with tempfile.TemporaryDirectory(prefix="breakdown-profiles-") as folder:
        text, summary = measure_all(args, kind, stages, methods, warmup, steps, Path(folder))
    print(text)
    print(summary)  # last: the one summary line, as every benchmark ends
    write_result(args.out / "breakdown.md", text)
    print(f"results in {args.out}", file=sys.stderr)


def measure_all(
    args: argparse.Namespace,
    kind: str,
    stages: int,
    methods: list[str],
    warmup: int,
    steps: int,
    profile_dir: Path,
) -> tuple[str, str]:
    """Every method's breakdown at ``stages`` (and at as many stages as cores, against the
    plan's figures) and the saved-tensor hooks' cost: the report's text and its summary line."""
    load_before = os.getloadavg()[0]
    # measured against profiled where every rank has a core of its own (wall time = compute)
    fit_stages = min(stages, len(os.sched_getaffinity(0)))
    table_rows, fits, weights = [], [], {}
    for method in methods:
        print(f"  {stages} stages, {method} ...", file=sys.stderr)
        results = measure(args.model, method, stages, warmup, steps, profile_dir / method, args.clock)
        for k, r in enumerate(results):
            per = 1e3 / r["mini_batches"]
            overhead_us = 1e6 * r["parts"]["overhead"] / max(r["actions"], 1)
            parts = [f"{r['parts'][p] * per:.2f}" for p in PARTS]
            rate = r["mini_batches"] / r["elapsed"]
            table_rows.append([method, k, *parts, f"{overhead_us:.0f}", f"{rate:.1f}"])
            weights[method] = weights.get(method, 0.0) + r["parts"]["weights"] * per
        if fit_stages != stages:
            print(f"  {fit_stages} stages, {method} ...", file=sys.stderr)
            folder = profile_dir / f"{method}-{fit_stages}"
            results = measure(args.model, method, fit_stages, warmup, steps, folder, args.clock)
        for k, r in enumerate(results):
            per = 1e3 / r["mini_batches"]
            measured = {
                "forward": r["parts"]["forward"],
                "backward": r["parts"]["backward"],
                "weights+step": r["parts"]["weights"] + r["parts"]["step"],
            }
            fits.append(
                [method, k]
                + [
                    f"{measured[p] * per:.2f} / {r['profiled'][p] * 1e3:.2f}"
                    + (
                        f" = {measured[p] / r['mini_batches'] / r['profiled'][p]:.2f}"
                        if r["profiled"][p]
                        else ""
                    )
                    for p in measured
                ]
            )
    plain, hooked = hook_cost(args.model, 10 if args.quick else 50, profile_dir)
    load_after = os.getloadavg()[0]
    *_, rows, description = MODELS[args.model]
    headers = ["method", "stage", *(f"{p} ms" for p in PARTS), "overhead µs/action", "mini-batches/s"]
    table = tabulate(table_rows, headers=headers, tablefmt="github")
    fit_table = tabulate(
        fits,
        headers=["method", "stage", "forward ms", "backward ms", "weights+step ms"],
        tablefmt="github",
    )
    hooks = (
        f"Saved-tensor hooks (backward redirected to other weights), stage 0 of 2, forward+backward: "
        f"{plain:.2f} ms without, {hooked:.2f} ms with ({hooked - plain:+.2f} ms, medians of interleaved "
        "repeats)."
    )
    summary = "weight policy ms per mini-batch, all stages: " + ", ".join(
        f"{m} {w:.2f}" for m, w in weights.items()
    )
    text = (
        f"# Where the time goes ({kind} run, CPU, gloo, 1 thread per rank, "
        f"{host()}, load average {load_before:.1f} before / {load_after:.1f} after)\n\n"
        f"{description}, {stages} stages; milliseconds per mini-batch of {CLOCK_WORDS[args.clock]} "
        f"({rows} rows; "
        f"2bw runs mini-batches of {stages} x {rows} rows and is counted per {rows}) over {steps} timed "
        f"mini-batches after {warmup}, cool-down included. `weights` is the weight policy (prediction, "
        f"stash or shadow copies; with torch's SGD, PipeOptim and SpecTrain predict inside the step, "
        f"counted under `step`), `recv wait` the wait for a neighbour's values, `send` posting and "
        f"retiring sends and receives, `overhead` the rest of the action loop.\n\n{table}\n\n{hooks}\n\n"
        f"{summary}\n\n## Measured in the workers / profiled by the plan ({fit_stages} stages)\n\n"
        f"Per mini-batch, each part timed as above in a run of {fit_stages} stages (a core per rank, "
        f"so that even wall time is compute time) against the plan's figure for it (the profile and "
        f"optimizer timing taken just before each method's run, one thread): measured / profiled "
        f"= ratio.\n\n"
        f"{fit_table}\n"
    )
    return text, summary


if __name__ == "__main__":
    main()
