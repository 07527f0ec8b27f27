"""How stage workers start: forked from a server that has imported torch, with the driver's
environment as it is when each pipeline starts (pipeoptim.runtime.spawning)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.errors import PipelineError
from pipeoptim.runtime.spawning import (
    SOCKET_PATH_MAX,
    run_processes,
    signals_deferred,
    socket_folder_fits,
    worker_context,
)

ROOT = Path(__file__).resolve().parents[1]


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


def _long_folder(tmp_path: Path) -> Path:
    """A folder whose path (100 characters) alone leaves no room for a socket name under it."""
    folder = tmp_path / ("t" * max(100 - len(str(tmp_path)) - 1, 1))
    folder.mkdir()
    return folder


@pytest.mark.slow
def test_workers_start_where_tmpdir_is_too_long_for_a_socket(tmp_path: Path) -> None:
    """With a $TMPDIR of 100 characters the fork server's socket path passes AF_UNIX's limit:
    the first worker's start failed with ``OSError: AF_UNIX path too long`` (helper-107).
    multiprocessing's folder now goes to /tmp (the first writable short folder), the pipeline
    trains as the local executor does, and $TMPDIR stays as set for everything else."""
    long = _long_folder(tmp_path)
    script = (
        "import multiprocessing.util as u, tempfile\n"
        "from pathlib import Path\n"
        "from tests.test_worker_start import first_loss\n"
        "if __name__ == '__main__':\n"
        "    folder = Path(tempfile.mkdtemp())\n"
        "    print(first_loss(folder, 'processes'), first_loss(folder, 'local'))\n"
        "    print(u.get_temp_dir())\n"
        "    print(tempfile.gettempdir())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=os.environ | {"TMPDIR": str(long)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses, socket_folder, temp = done.stdout.strip().splitlines()[-3:]
    processes, local = map(float, losses.split())
    assert processes == pytest.approx(local, rel=1e-6)
    assert socket_folder.startswith("/tmp/pymp-") and temp == str(long)


def test_a_tmpdir_too_long_with_no_short_folder_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(_long_folder(tmp_path)))
    with pytest.raises(PipelineError, match=r"set TMPDIR to a folder of at most 75 characters") as info:
        socket_folder_fits(short_folders=())
    assert f"at most {SOCKET_PATH_MAX} characters" in str(info.value) and "none of" in str(info.value)
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    socket_folder_fits(short_folders=())  # a short $TMPDIR: nothing to do


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


def _reply(i: int, out) -> None:
    """Process ``i`` of the run_processes tests: 1 fails, 2 waits (as a rank waits on a lost
    peer), 4 is sent a Ctrl-C first, 5 exits without a reply; the others reply ``(i, 10 i)``."""
    if i == 1:
        raise SystemExit(3)
    if i == 5:
        return
    if i == 2:
        time.sleep(120)
    if i == 4:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
    out.put((i, 10 * i))


def test_run_processes_gathers_replies_by_key_through_a_ctrl_c() -> None:
    assert run_processes(_reply, [(0,), (3,), (4,)], "three") == {0: 0, 3: 30, 4: 40}
    assert not multiprocessing.active_children()


def test_run_processes_names_a_failed_process_at_once_and_stops_the_others() -> None:
    """A benchmark's rank that failed left its driver waiting 10 minutes per rank (helper-107:
    breakdown.py with a bad PIPEOPTIM_CPU_AFFINITY); the failure now ends the wait within a
    poll and the process still waiting is killed."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^three: process 1 exited with code 3 \(see its output above\)$"):
        run_processes(_reply, [(0,), (1,), (2,)], "three", timeout=60)
    assert time.monotonic() - start < 20
    assert not multiprocessing.active_children()


def test_run_processes_names_replies_missing_once_every_process_exited() -> None:
    """A process that exits cleanly without its reply left the wait running to the timeout
    (helper-108); it ends once every process has exited."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^two: every process exited with 1 of 2 replies in$"):
        run_processes(_reply, [(0,), (5,)], "two", timeout=60)
    assert time.monotonic() - start < 20


def test_a_pipeline_dropped_without_close_is_collected_and_its_workers_end(tmp_path) -> None:
    """The monitor thread held its executor, and so the pipeline: a loop of trials in a sweep
    or a notebook kept every pipeline and its workers (260 MB each) until exit (helper-130)."""

    def trial() -> tuple[weakref.ref, list]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        x, y = torch.randn(8, 4), torch.randn(8, 2)
        options = {"loss_fn": scaled_loss, "executor": "processes", "profile_dir": tmp_path}
        pipe = pipeoptim.compile(
            model, torch.optim.SGD(model.parameters(), lr=0.1), 2, example_inputs=x, **options
        )
        pipe.step(x, y).item()
        return weakref.ref(pipe), list(pipe._executor.processes)

    ref, workers = trial()
    gc.collect()
    assert ref() is None
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p.is_alive() for p in workers)


SETTING_MODULE = """
import torch
from torch import nn

SCALE = 1.0


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x) * SCALE
"""


def test_a_setting_changed_after_import_is_named_where_a_worker_traces_otherwise(
    tmp_path, monkeypatch
) -> None:
    """A worker imports the model's module again, with the file's value of a setting the
    script reassigned: the profile key follows such settings (this session), and the worker
    said the plan was made for another model."""
    (tmp_path / "setting_model.py").write_text(SETTING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    import setting_model

    monkeypatch.setattr(setting_model, "SCALE", 3.0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), setting_model.Scaled())
    options = {"loss_fn": F.mse_loss, "executor": "processes", "profile_dir": None, "leaf_modules": ["2"]}
    with pytest.raises(
        pipeoptim.PipeoptimError, match=r"a module-level value the script set after importing its module"
    ):
        pipeoptim.compile(
            model, torch.optim.SGD(model.parameters(), lr=0.1), 2, example_inputs=torch.randn(8, 4), **options
        )
