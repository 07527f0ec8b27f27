"""Shared test helpers."""

from __future__ import annotations

import os
import random
import shutil
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
    # the temporary files of the programs the tests start (torchrun's log folders, the
    # multiprocessing sockets of a driver a test kills) go into one folder, removed at the end;
    # this process's own (pytest's tmp_path among them) stay where tempfile had put them
    tempfile.gettempdir()  # read before $TMPDIR changes
    _SUBPROCESS_TMPDIR[:] = [os.environ.get("TMPDIR"), tempfile.mkdtemp(prefix="pipeoptim-test-tmp-")]
    os.environ["TMPDIR"] = _SUBPROCESS_TMPDIR[1]


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop(CACHE_ENV, ""), ignore_errors=True)
    if _SUBPROCESS_TMPDIR:
        before, folder = _SUBPROCESS_TMPDIR
        shutil.rmtree(folder, ignore_errors=True)
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before


#: $TMPDIR before the test session (``None``: unset) and the folder it points to during it
_SUBPROCESS_TMPDIR: list = []


@pytest.fixture(scope="session", autouse=True)
def _working_folder_of_its_own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite runs in a folder of its own: what a test writes to a relative path (above all
    pipeoptim's default profile folder ``profiles/``) goes there, not into the checkout, and no
    test plans from a profile an earlier run or the user left there (one unlucky timing in a
    kept profile put a BatchNorm on stage 1 and failed a test until the folder was cleared,
    helper-110)."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


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
