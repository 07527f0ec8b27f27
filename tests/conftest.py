"""Shared test helpers."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from pipeoptim.compiler.costgraph import CostGraph, CostNode
from pipeoptim.machine_costs import CACHE_ENV
from pipeoptim.shared_folder import shared_folder

SHARED = shared_folder()  # $PIPEOPTIM_SHARED, else ../shared beside the checkout


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(int(os.environ.get("PIPEOPTIM_TEST_THREADS", "1")))
    # this machine's measured link and runtime figures (pipeoptim.machine_costs): measured once
    # per test session, into a folder of its own, not the user's cache (nor from it)
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="pipeoptim-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop(CACHE_ENV, ""), ignore_errors=True)


@pytest.fixture
def shared_dir() -> Path:
    """The ``../shared`` folder beside the checkout; skips the test where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real data and GPU cost graphs live there)")
    return SHARED


def random_cost_graph(rng: random.Random, n: int, *, chain: bool = False, max_inputs: int = 2) -> CostGraph:
    """A random DAG of ``n`` compute nodes behind one input and before one output."""
    nodes = [CostNode("x", "placeholder", "x", [], out_bytes=rng.randint(1, 200))]
    for i in range(n):
        if chain:
            inputs = [nodes[-1].name]
        else:
            k = rng.randint(1, min(max_inputs, len(nodes)))
            inputs = sorted({rng.choice(nodes).name for _ in range(k)}, key=lambda s: s)
        size = rng.randint(1, 1000)
        nodes.append(
            CostNode(
                f"n{i}",
                "call_function",
                "f",
                inputs,
                fwd_s=rng.uniform(0.1, 1.0),
                bwd_s=rng.uniform(0.1, 2.0),
                out_bytes=size,
                grad_bytes=size,
                param_bytes=rng.randint(0, 1000),
                saved_bytes=rng.randint(0, 500),
            )
        )
    nodes.append(CostNode("output", "output", "output", [nodes[-1].name]))
    return CostGraph("random", nodes, batch_size=1)
