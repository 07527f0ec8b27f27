"""How stage workers start: forked from a server that has imported torch, with the driver's
environment as it is when each pipeline starts (pipeoptim.runtime.spawning)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.runtime.spawning import signals_deferred, worker_context


def scaled_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean squared error times ``$PIPEOPTIM_TEST_LOSS_SCALE`` as the last stage's worker
    process sees it (1 when unset)."""
    return F.mse_loss(outputs, targets) * float(os.environ.get("PIPEOPTIM_TEST_LOSS_SCALE", "1"))


def first_loss(tmp_path, executor: str) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with pipeoptim.compile(
        model, opt, 2, example_inputs=x, loss_fn=scaled_loss, executor=executor, profile_dir=tmp_path
    ) as pipe:
        return pipe.step(x, y).item()


@pytest.mark.slow
def test_workers_see_the_environment_of_their_pipelines_start(tmp_path, monkeypatch) -> None:
    """The fork server keeps the environment of the driver's first pipeline; a variable set
    after it (as GLOO_SOCKET_IFNAME might be) still reaches the next pipeline's workers."""
    monkeypatch.delenv("PIPEOPTIM_TEST_LOSS_SCALE", raising=False)
    plain = first_loss(tmp_path, "processes")  # starts the server (if it was not yet running)
    assert plain == pytest.approx(first_loss(tmp_path, "local"), rel=1e-6)
    monkeypatch.setenv("PIPEOPTIM_TEST_LOSS_SCALE", "3")
    assert first_loss(tmp_path, "processes") == pytest.approx(3 * plain, rel=1e-6)
    monkeypatch.delenv("PIPEOPTIM_TEST_LOSS_SCALE")
    assert first_loss(tmp_path, "processes") == pytest.approx(plain, rel=1e-6)


def test_workers_fork_from_a_server_on_a_cpu_machine() -> None:
    context = worker_context()
    expected = "spawn" if torch.cuda.is_available() else "forkserver"
    assert context.get_start_method() == expected


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopping_signal_waits_for_the_workers_start_and_reaches_its_handler(signum: int) -> None:
    """A SIGTERM while `pipeoptim train` started its workers cut a start short: the child went
    on starting after the driver had gone and printed a FileNotFoundError traceback from the
    fork server (only Ctrl-C was deferred). Both signals now wait for the block's end and then
    reach the handler there was before, once each, an ignored one staying ignored."""
    calls: list[str] = []
    previous = signal.signal(signum, lambda s, _f: calls.append("handled"))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)  # a terminal's Ctrl-C and one forwarded by `timeout`
            time.sleep(0.05)
            calls.append("block ended")
        assert calls == ["block ended", "handled"]
        signal.signal(signum, signal.SIG_IGN)
        with signals_deferred():
            os.kill(os.getpid(), signum)
        assert calls == ["block ended", "handled"]
        assert signal.getsignal(signum) == signal.SIG_IGN
    finally:
        signal.signal(signum, previous)
