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
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import pipeoptim
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, into a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="where memory.md goes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or (Path(tempfile.mkdtemp(prefix="memory-")) if args.quick else Path("benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    names = ["digits-cnn"] if args.quick else list(MODELS)
    with tempfile.TemporaryDirectory() as profiles:
        rows = [r for name in names for method in METHODS for r in compare(name, method, Path(profiles))]
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
    (out / "memory.md").write_text(f"# Predicted and measured memory per stage\n\n{table}\n\n{summary}\n")
    print(table)
    print(summary)
    sys.exit(0 if worst <= 0.15 else 1)


if __name__ == "__main__":
    main()
