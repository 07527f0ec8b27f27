"""The plan's per-stage memory against the memory each stage holds while training.

For the benchmark models (the digits CNN of ``pipeoptim train digits``, the deep MLP of
``throughput.py`` and the tiny GPT of the examples), 4 stages and every method, the local
executor trains a few mini-batches with :attr:`StageRuntime.measure_memory` on, and each stage
reports its peak: weights (every version kept), gradients, optimizer state, buffers and the
saved activations of the micro-batches in flight (storages counted once, weights excluded).
The plan predicts the same quantities (:func:`pipeoptim.compiler.costmodel.evaluate`).

    python benchmarks/memory.py [--quick] [--out DIR]

Prints one row per model, method and stage (predicted / measured bytes and their ratio) and
writes ``memory.md`` into ``--out`` (a temporary folder with ``--quick``).

Planned recomputation (:func:`recomputation`): the tiny GPT under GPipe (4 micro-batches) with
a per-stage memory limit halfway between the smallest plan with recomputation and the smallest
without: planning without recomputation is refused, with it the planner picks the stages that
recompute; their predicted and measured peak bytes, and the predicted stage times with and
without recomputation (the throughput it costs).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from outputs import OUT_HELP, results_dir, write_result
from tabulate import tabulate
from torch import nn

import pipeoptim
from pipeoptim.compiler import profile_model
from pipeoptim.compiler.boundaries import stage_input_bytes
from pipeoptim.compiler.costmodel import evaluate
from pipeoptim.compiler.partition import min_memory_plan
from pipeoptim.compiler.plan import make_plan
from pipeoptim.compiler.summary import summarize
from pipeoptim.errors import InfeasibleMemoryError
from pipeoptim.examples import TinyGPT
from pipeoptim.methods import METHODS
from pipeoptim.tasks.images import ConvNet

STAGES, STEPS = 4, 6


def digits_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    torch.manual_seed(0)
    model = ConvNet(8, dropout=0.0)
    return model, torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)), F.cross_entropy


def deep_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return (
        nn.Sequential(*layers, nn.Linear(256, 10)),
        torch.randn(32, 256),
        torch.randint(0, 10, (32,)),
        F.cross_entropy,
    )


def tiny_gpt() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (8, 16))

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return TinyGPT(vocab=64, dim=32, heads=2, layers=4, context=16), ids, torch.roll(ids, -1, 1), loss_fn


MODELS = {"digits-cnn": digits_cnn, "deep-mlp": deep_mlp, "tiny-gpt": tiny_gpt}


def compare(name: str, method: str, profile_dir: Path) -> list[dict[str, Any]]:
    """Predicted and measured memory of each stage of ``name`` trained with ``method``."""
    model, x, y, loss_fn = MODELS[name]()
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    micro = {"micro_batches": 4} if METHODS[method].micro_batched else {}
    with pipeoptim.compile(
        net,
        optimizer,
        STAGES,
        example_inputs=x,
        loss_fn=loss_fn,
        method=method,
        executor="local",
        profile_dir=profile_dir,
        **micro,
    ) as pipe:
        stages = pipe._executor.stages
        for stage in stages:
            stage.measure_memory = True
        for _ in range(STEPS):
            pipe.step(x, y)
        pipe.flush()
        rows = []
        for stage, plan in zip(stages, pipe.plan.stages):
            report = stage.memory_report()
            buffers = sum(b.numel() * b.element_size() for b in stage.module.buffers())
            measured = (
                report["weight_bytes"]
                + report["param_bytes"]  # gradients
                + report["optimizer_state_bytes"]
                + buffers
                + report["activation_bytes"]
            )
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "stage": stage.index,
                    "predicted": plan.memory_bytes,
                    "measured": measured,
                    "ratio": plan.memory_bytes / measured,
                    "activations predicted": plan.activation_bytes,
                    "activations measured": report["activation_bytes"],
                    "weight copies predicted": plan.copy_bytes // max(plan.param_bytes, 1),
                    "weight copies measured": report["weight_versions"] - 1,
                }
            )
        return rows


def _measure(pipe: Any, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, int]]:
    """Train :data:`STEPS` mini-batches measuring what each stage holds; per stage its peak
    bytes (weights, gradients, optimizer state, buffers, activations) and activations."""
    stages = pipe._executor.stages
    for stage in stages:
        stage.measure_memory = True
    for _ in range(STEPS):
        pipe.step(x, y)
    pipe.flush()
    result = []
    for stage in stages:
        report = stage.memory_report()
        buffers = sum(b.numel() * b.element_size() for b in stage.module.buffers())
        held = report["weight_bytes"] + report["param_bytes"] + report["optimizer_state_bytes"] + buffers
        result.append({"total": held + report["activation_bytes"], "activations": report["activation_bytes"]})
    return result


def recomputation(profile_dir: Path, model_name: str = "tiny-gpt", method: str = "gpipe") -> tuple[str, str]:
    """The planned-recomputation section (module docstring): its markdown and one summary line."""
    model, x, y, loss_fn = MODELS[model_name]()
    micro = 4
    graph, _ = profile_model(model, (x[: x.shape[0] // micro],), profile_dir=profile_dir)
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    options = {"example_inputs": x, "loss_fn": loss_fn, "method": method, "micro_batches": micro}
    with pipeoptim.compile(net, optimizer, STAGES, executor="local", profile_dir=profile_dir, **options) as p:
        unlimited, config = p.plan, p.plan.config  # the plan compile makes without a limit
    least = min_memory_plan(graph, config).memory_bytes
    without = min_memory_plan(graph, replace(config, recompute=False)).memory_bytes
    limit = (least + without) // 2
    try:
        make_plan(graph, replace(config, memory_limit=limit, recompute=False))
        raise AssertionError(f"a plan without recomputation fits in {limit} bytes")
    except InfeasibleMemoryError as exc:
        refused = str(exc)
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    with pipeoptim.compile(
        net, optimizer, STAGES, executor="local", profile_dir=profile_dir, memory=limit, **options
    ) as pipe:
        plan = pipe.plan
        measured = _measure(pipe, x, y)
    stage_of = [plan.stage_of[n.name] for n in graph.nodes]
    alone = evaluate(graph, stage_of, plan.config, [False] * STAGES)
    inputs = stage_input_bytes(graph, stage_of, STAGES)
    rows = [
        {
            "stage": s.index,
            "recompute": "yes" if s.recompute else "no",
            "predicted": s.memory_bytes,
            "measured": m["total"],
            "activations predicted": s.activation_bytes,
            "of which kept": plan.config.in_flight(s.index) * inputs[s.index] if s.recompute else "",
            "activations measured": m["activations"],
            "stage ms": s.time_s * 1e3,
            "stage ms without recompute": a.time_s * 1e3,
        }
        for s, m, a in zip(plan.stages, measured, alone)
    ]
    table = tabulate(rows, headers="keys", floatfmt=".3f", intfmt=",", tablefmt="github")
    bottleneck = plan.summary["bottleneck_s"]
    same_cuts = summarize(graph, alone, plan.config)["bottleneck_s"]
    free = unlimited.summary["bottleneck_s"]
    line = (
        f"planned recomputation, {model_name} {method} {STAGES} stages M={micro}, limit {limit:,} bytes "
        f"(least with recomputation {least:,}, without {without:,}): stages "
        f"{', '.join(str(k) for k, r in enumerate(plan.recompute) if r)} recompute; bottleneck "
        f"{bottleneck * 1e3:.3f} ms predicted ({bottleneck / same_cuts:.2f}x the same cuts without "
        f"recomputation, {bottleneck / free:.2f}x the plan without a limit, {free * 1e3:.3f} ms)"
    )
    text = (
        "## Planned recomputation\n\n"
        f"{model_name}, method {method}, {STAGES} stages, {micro} micro-batches, per-stage limit "
        f"{limit:,} bytes (halfway between the smallest plan with recomputation, {least:,}, and "
        f"without, {without:,}). Planning without recomputation is refused:\n\n> {refused}\n\n"
        "With it, the plan below. A recomputing stage is predicted to keep the inputs it reads for "
        "every micro-batch in flight (*of which kept*) plus the saved activations of the one "
        "micro-batch it recomputes at a time during the backward; the held-bytes measure sees only "
        "what is kept between forward and backward (and, on the last stage, the loss's saved "
        "tensors, outside the plan).\n\n"
        f"{table}\n\n{line}\n"
    )
    return text, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, into a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = results_dir(parser, args, "memory")
    out.mkdir(parents=True, exist_ok=True)
    names = ["digits-cnn"] if args.quick else list(MODELS)
    with tempfile.TemporaryDirectory() as profiles:
        rows = [r for name in names for method in METHODS for r in compare(name, method, Path(profiles))]
        recomputed, recomputed_line = recomputation(Path(profiles))
    table = tabulate(rows, headers="keys", floatfmt=".3f", intfmt=",", tablefmt="github")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    copies = [
        f"{r['model']} {r['method']} stage {r['stage']} ({r['weight copies predicted']} predicted, "
        f"{r['weight copies measured']} measured)"
        for r in rows
        if r["weight copies predicted"] != r["weight copies measured"]
    ]
    summary = (
        f"predicted / measured memory per stage: {min(r['ratio'] for r in rows):.3f}x to "
        f"{max(r['ratio'] for r in rows):.3f}x (worst {worst:.1%} off) over {len(rows)} stages; "
        f"weight copies differ on {', '.join(copies) or 'none'}"
    )
    write_result(
        out / "memory.md",
        f"# Predicted and measured memory per stage\n\n{table}\n\n{summary}\n\n{recomputed}",
    )
    print(table)
    print(recomputed_line)
    print(summary)
    sys.exit(0 if worst <= 0.15 else 1)


if __name__ == "__main__":
    main()
