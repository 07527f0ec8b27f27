"""The plan's memory model against what the stages hold (benchmarks/memory.py), and the
measurement against a count written by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.methods import METHODS
from pipeoptim.runtime.held_bytes import saved_bytes

ROOT = Path(__file__).resolve().parents[1]


def benchmark():
    """benchmarks/memory.py as a module (it imports its sibling ``outputs``: run alone, this
    file failed to load it unless test_benchmarks had put benchmarks/ on the path first)."""
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


@pytest.mark.parametrize("model", ["digits-cnn", pytest.param("tiny-gpt", marks=pytest.mark.slow)])
def test_predicted_memory_is_within_15_percent_of_measured_for_every_method(model: str, tmp_path) -> None:
    bench = benchmark()
    for method in METHODS:
        for row in bench.compare(model, method, tmp_path):
            where = f"{model} {method} stage {row['stage']}"
            assert row["ratio"] == pytest.approx(1.0, abs=0.15), where
            # the tied embedding is a copy held by each stage using it, never sent on, so no
            # stage keeps an extra version of it per micro-batch in flight
            assert row["weight copies predicted"] == row["weight copies measured"], where


def test_saved_activations_counted_once_as_written_by_hand() -> None:
    """Linear(8, 16) -> ReLU -> Linear(16, 4) on a batch of 5 that needs no gradient saves
    the input (for the first weight's gradient, 5·8 floats) and the ReLU output, which the
    ReLU and the second linear layer both save (5·16 floats, once); the loss keeps its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    by_hand = (5 * 8 + 5 * 16) * 4
    x = torch.randn(5, 8)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert saved_bytes([model(x)], weights) == by_hand  # what the stages report
    with pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        1,
        example_inputs=torch.randn(10, 8),
        loss_fn=F.cross_entropy,
        method="gpipe",
        micro_batches=2,
        executor="local",
        profile_dir=None,
    ) as pipe:
        logits_bytes = 5 * 4 * 4  # the plan's estimate of what the loss keeps: one copy of the logits
        assert pipe.plan.stages[0].activation_bytes == 2 * (by_hand + logits_bytes)  # M = 2 micro-batches
        stage = pipe._executor.stages[0]
        stage.measure_memory = True
        pipe.step(torch.randn(10, 8), torch.randint(0, 4, (10,))).wait()
        logits = torch.randn(5, 4, requires_grad=True)  # the loss's own saved tensors, per micro-batch
        loss_saved = saved_bytes([F.cross_entropy(logits, torch.zeros(5, dtype=torch.long)) * 0.5], set())
        assert loss_saved >= 5 * 4 * 4  # at least its log-softmax
        assert stage.memory_report()["activation_bytes"] == 2 * (by_hand + loss_saved)
