"""Under torchrun every rank runs its stage; the numbers equal the local executor's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pipeoptim
from pipeoptim.runtime.affinity import binding_wanted, rank_cores
from pipeoptim.runtime.distributed import free_port

from .test_training import SmallCNN, data

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(script: str, stages: int, *args: str) -> subprocess.CompletedProcess:
    """``script`` (in tests/) under torchrun with ``stages`` ranks on this host."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(stages),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        str(ROOT / "tests" / script),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, only_needed", [("pipeoptim", False), ("1f1b", False), ("1f1b", True), ("pipeoptim", True)]
)
def test_torchrun_ranks_equal_local_executor(tmp_path: Path, method: str, only_needed: bool) -> None:
    """With ``only_needed`` the other ranks pass None for inputs and targets, and the last
    mini-batch (1 row) is smaller than M (2 for 1f1b)."""
    stages = 2
    args = [str(tmp_path / "out"), str(stages), method, str(tmp_path / "profiles")]
    done = _torchrun("torchrun_script.py", stages, *args, *(["only-needed"] if only_needed else []))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(stages)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank sees every loss
    # rank 0 holds the loss receives of the last N mini-batches at most; the last rank none
    assert ranks[0]["receives"] <= stages and ranks[0]["unresolved"] <= stages
    assert ranks[1]["receives"] == 0
    assert ranks[0]["state"] == ranks[1]["state"]
    if binding_wanted():
        mine = os.sched_getaffinity(0)
        assert [r["cores"] for r in ranks] == [rank_cores(r, stages, mine) for r in range(stages)]
        assert [r["cores after close"] for r in ranks] == [sorted(mine)] * stages

    torch.manual_seed(0)  # rank 0's initial weights, which it broadcast to the others
    model = SmallCNN()
    batches = data(10)
    if only_needed:
        batches += data(1, batch=1, seed=9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        executor="local",
        profile_dir=tmp_path / "profiles",
    ) as pipe:
        losses = list(pipe.train(batches))
        assert pipe.plan.stage_of == ranks[0]["plan"]
        predicted = pipe.predict(batches[0][0])
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(torch.tensor(ranks[1]["predict"]), predicted, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_pipelines_in_one_job_keep_their_messages_apart(tmp_path: Path) -> None:
    """Two asynchronous pipelines in one torchrun job, their mini-batches interleaved without
    a flush, only the first and last rank given data (the batch sizes and losses travel as
    messages), the user's own send between their steps: each pipeline trains as it does
    alone (the local executor) and the user's message arrives untouched. With both on the
    default process group (before each pipeline had its own), rank 0's flush of the first
    posted the receives of its last two micro-batches' gradients while rank 1 had sent the
    second pipeline's in between: the first trained on the second's gradients, then hung."""
    from .torchrun_two_pipelines_script import PIPELINES

    stages = 3
    done = _torchrun(
        "torchrun_two_pipelines_script.py", stages, str(tmp_path / "out"), str(stages), str(tmp_path / "p")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(stages)]
    for p, (method, seed, data_seed) in enumerate(PIPELINES):
        torch.manual_seed(seed)  # rank 0's initial weights
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batches = data(8, seed=data_seed)
        with pipeoptim.compile(
            model,
            opt,
            stages,
            example_inputs=data(1)[0][0],
            loss_fn=F.cross_entropy,
            method=method,
            executor="local",
            profile_dir=tmp_path / "p",
        ) as pipe:
            losses = [float(loss) for loss in [pipe.step(*b) for b in batches]]
            pipe.flush()
            state = pipe.state_dict()
        for r in range(stages):
            assert ranks[r][p]["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6), (method, r)
        for name, value in state.items():
            torch.testing.assert_close(torch.tensor(ranks[0][p]["state"][name]), value, rtol=1e-5, atol=1e-6)


def test_wrong_world_size_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(pipeoptim.PipelineError, match="nproc-per-node 2"):
        pipeoptim.compile(
            model, opt, 2, example_inputs=torch.randn(8, 1, 8, 8), loss_fn=F.cross_entropy, profile_dir=None
        )
