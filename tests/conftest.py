"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def _folders_of_its_own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite runs in folders of its own under pytest's (kept for its last 3 runs):
    - its working folder: what a test writes to a relative path (above all pipeoptim's default
      profile folder ``profiles/``) goes there, not into the checkout, and no test plans from a
      profile an earlier run or the user left there (one unlucky timing in a kept profile put a
      BatchNorm on stage 1 and failed a test until the folder was cleared, helper-110);
    - ``$TMPDIR`` of the programs the tests start: torchrun's log folders and the
      multiprocessing sockets of a driver a test kills left about 20 folders in /tmp per run
      (this process's own temporary folder was read before, and stays)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield


@contextlib.contextmanager
def ctrl_c_delivered() -> Iterator[None]:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in this process, and programs it starts get it
    as from a terminal, even where the test runner ignores it: pytest started as a background
    job of a non-interactive shell inherits an ignored SIGINT, and so did every program it
    started (Python leaves an ignored SIGINT ignored): the Ctrl-C tests saw their runs go on
    to the end (helper-117)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def shared_dir() -> Path:
    """The ``../shared`` folder beside the checkout; skips the test where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real data and GPU cost graphs live there)")
    return SHARED


def random_cost_graph(
    rng: random.Random, n: int, *, chain: bool = False, max_inputs: int = 2, storages: bool = False
) -> CostGraph:
    """A random DAG of ``n`` compute nodes behind one input and before one output. With
    ``storages``, the saved activations are storages, as a profile measures them: each node
    saves some of its inputs and perhaps its own output (a ReLU), a value saved by its
    producer and its readers or by two readers is one storage, counted in ``saved_bytes`` at
    its first saver (:mod:`pipeoptim.compiler.saved_bytes`)."""
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
    if storages:
        counted: set[str] = set()
        sizes = {node.name: node.out_bytes for node in nodes}
        for node in nodes[1:]:
            kept = [v for v in node.inputs if rng.random() < 0.7] + (
                [node.name] if rng.random() < 0.5 else []
            )
            node.saved = {v: sizes[v] for v in kept}
            node.saved_bytes = sum(b for v, b in node.saved.items() if v not in counted)
            counted |= set(kept)
    nodes.append(CostNode("output", "output", "output", [nodes[-1].name]))
    return CostGraph("random", nodes, batch_size=1)
