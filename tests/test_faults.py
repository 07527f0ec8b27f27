"""Faults: a killed stage, Ctrl-C in the driver, a crash while writing a file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import pipeoptim
from pipeoptim.checkpoint import read_checkpoint
from pipeoptim.errors import PipelineError
from pipeoptim.fileio import STALE_SECONDS, atomic_write, write_json
from pipeoptim.runtime.driver_watch import driver_alive, process_start_time
from pipeoptim.runtime.spawning import free_port

from .conftest import ctrl_c_delivered
from .test_training import SmallCNN, data

ROOT = Path(__file__).resolve().parents[1]


def _processes() -> dict[int, tuple[int, bytes]]:
    """Every process: pid -> (parent pid, command line)."""
    found: dict[int, tuple[int, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def fork_servers(pid: int) -> list[int]:
    """Pids of driver ``pid``'s fork servers (pipeoptim.runtime.spawning.worker_context)."""
    return sorted(p for p, (parent, cmd) in _processes().items() if parent == pid and b"forkserver" in cmd)


def children(pid: int) -> list[int]:
    """Pids of driver ``pid``'s stage worker processes, in start order: the children of its
    fork server, or its own spawned children."""
    servers = set(fork_servers(pid))
    return sorted(
        p
        for p, (parent, cmd) in _processes().items()
        if parent in servers or (parent == pid and b"spawn_main" in cmd)
    )


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def three_stage_processes(batches: list) -> pipeoptim.Pipeline:
    """SmallCNN as 3 stage worker processes (30 s timeout), unsaved profiles."""
    model = SmallCNN()
    return pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        3,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        executor="processes",
        profile_dir=None,
        timeout=30,
    )


@pytest.mark.slow
def test_killed_stage_stops_every_process_with_its_name() -> None:
    batches = data(40)
    pipe = three_stage_processes(batches)
    workers = [p.pid for p in pipe._executor.processes]
    for x, y in batches[:5]:
        pipe.step(x, y)
    pipe.flush()
    os.kill(workers[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(PipelineError, match=r"stage 1 \(pid \d+\).*(killed by signal 9|exit code -9)"):
        for x, y in batches[5:]:
            pipe.step(x, y).wait()
    assert time.monotonic() - start < 30
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 10)
    pipe.close()


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_a_stage_killed_mid_run_is_blamed_not_its_neighbours(rank: int) -> None:
    """The neighbours of a killed stage see their connections close, often before the driver
    sees the death: their errors are consequences, and the error names the killed stage
    (a fresh-clone CI run named stage 1 when stage 2 was killed)."""
    batches = data(20)
    pipe = three_stage_processes(batches)
    workers = [p.pid for p in pipe._executor.processes]
    pipe.step(*batches[0]).wait()
    killer = threading.Timer(0.3, os.kill, (workers[rank], signal.SIGKILL))
    killer.start()
    with pytest.raises(PipelineError, match=rf"stage {rank} \(pid \d+\) was killed by signal 9"):
        for i in range(100_000):
            pipe.step(*batches[i % len(batches)])
    killer.join()
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 10)
    pipe.close()


def test_a_stage_error_under_an_asynchronous_method_stops_the_stages_at_once() -> None:
    """The stages still blocked in a receive end on the driver's terminate(): the error came
    after the driver's whole 5 s grace under pipeoptim and pipedream (their SIGTERM blocked since
    their start), in 0.02 s under 1f1b (helper-98). A SIGTERM from any other sender (one to
    the whole process group) leaves them running: the driver stops the run."""
    batches = data(8)
    pipe = three_stage_processes(batches)
    workers = pipe._executor.processes
    x, y = batches[0]
    float(pipe.step(x, y))
    subprocess.run(["kill", "-TERM", str(workers[1].pid)], check=True)  # not the driver's
    time.sleep(0.5)
    assert all(p.is_alive() for p in workers)
    float(pipe.step(x, y))
    start = time.monotonic()
    with pytest.raises(PipelineError, match="stage 2 failed: IndexError"):
        float(pipe.step(x, torch.full_like(y, 99)))
    assert time.monotonic() - start < 2.5  # the grace is 5 s
    assert wait_for(lambda: all(p.exitcode is not None for p in workers), 2)
    # the stages blocked in a receive end by the driver's SIGTERM; the failed one by its own
    # exit (1), or by the SIGTERM where that came first (helper-101, under load)
    codes = [p.exitcode for p in workers]
    assert codes[:2] == [-signal.SIGTERM, -signal.SIGTERM] and codes[2] in (1, -signal.SIGTERM), codes
    # later calls say that the pipeline has stopped, not the stage's error again as if new
    # (helper-98: state_dict() after a failure re-raised "stage 2 failed: IndexError ...")
    stopped = (
        r"the pipeline stopped at an earlier error \(PipelineError: stage 2 failed: IndexError.*load the last"
    )
    for later in (lambda: pipe.step(x, y), pipe.state_dict, lambda: pipe.save_checkpoint("unused.pt")):
        with pytest.raises(PipelineError, match=stopped):
            later()
    pipe.close()


@pytest.mark.slow
def test_a_single_stage_stuck_in_its_compute_fails_at_the_timeout() -> None:
    """With one stage no neighbour's receive times out: a worker stuck in its forward (a
    deadlock in user code; here stopped by SIGSTOP) left loss.wait() blocked forever."""
    batches = data(4)
    model = SmallCNN()
    pipe = pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        1,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        executor="processes",
        profile_dir=None,
        timeout=3,
    )
    worker = pipe._executor.processes[0].pid
    pipe.step(*batches[0]).wait()
    os.kill(worker, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(PipelineError, match="timed out after 3 s waiting for the loss of micro-batch 1"):
        pipe.step(*batches[1]).wait()
    assert time.monotonic() - start < 15
    assert wait_for(lambda: not alive(worker), 10)
    pipe.close()


class ExitsWhenArmed(torch.nn.Module):
    """A layer whose process ends with ``os._exit(code)`` (no error reported) once ``flag`` exists."""

    def __init__(self, flag: str, code: int) -> None:
        super().__init__()
        self.flag, self.code = flag, code
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.path.exists(self.flag):
            os._exit(self.code)
        return self.lin(x)


@pytest.mark.slow
@pytest.mark.parametrize("code", [3, 0])
def test_a_stage_that_exits_with_a_code_is_blamed_not_its_neighbour(tmp_path: Path, code: int) -> None:
    """Only a stage killed by a signal was found as the cause: one that ended with exit code 3
    was reported as its neighbour's "connection closed by peer", and one ending with 0 still
    was (helper-130)."""
    flag = tmp_path / "armed"
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), ExitsWhenArmed(str(flag), code)
    )
    pipe = pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        2,
        example_inputs=torch.randn(8, 8),
        loss_fn=F.mse_loss,
        executor="processes",
        profile_dir=None,
        timeout=30,
        leaf_modules=["3"],
    )
    pipe.step(torch.randn(8, 8), torch.randn(8, 8)).wait()
    flag.write_text("")
    with pytest.raises(PipelineError, match=rf"stage 1 \(pid \d+\) died with exit code {code} \(no error"):
        for _ in range(20):
            pipe.step(torch.randn(8, 8), torch.randn(8, 8)).wait()
    pipe.close()


def test_every_call_to_a_killed_peer_is_reported_as_a_lost_peer() -> None:
    """gloo's own errors for a peer that went away (raised by any call, not only by the waits
    the channel wraps) are classified as :class:`PeerLostError` by ``lost_peer``."""
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "lost_peer_script.py"), str(rank), port],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for rank in (0, 1)
    ]
    try:
        assert [p.stdout.readline().strip() for p in ranks] == ["ready", "ready"]
        ranks[1].kill()
        ranks[1].wait(10)
        out, _ = ranks[0].communicate("go\n", timeout=60)
    finally:
        for p in ranks:
            p.kill()
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["recv", "irecv", "send", "isend", "all_reduce", "barrier"]
    assert all(line.split()[1] == "PeerLostError" for line in lines), out


def start_training(
    out: Path,
    *extra: str,
    epochs: int = 3,
    group: bool = False,
    env: dict[str, str] | None = None,
    program: tuple[str, ...] = ("-m", "pipeoptim"),
) -> subprocess.Popen:
    """``pipeoptim train digits`` in the background; ``group``: in a process group of its own,
    so that a test can signal the whole group as a terminal's Ctrl-C does; ``env``: variables
    to set; ``program``: what Python runs (``-m pipeoptim``, or the console script's path)."""
    cmd = [
        sys.executable,
        *program,
        "train",
        "digits",
        "--gpus",
        "3",
        "--stages",
        "3",
        "--epochs",
        str(epochs),
        "--checkpoint-every",
        "10",
        "--out",
        str(out),
        "--quiet",
        "--profile-dir",
        str(out.parent / "p"),
        *extra,
    ]
    with ctrl_c_delivered():  # as from a terminal, even where this runner ignores Ctrl-C
        return subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            start_new_session=group,
        )


# A fault is delivered while the run is certainly still going: the runs below are far longer
# (100 epochs, minutes) than the test waits, so a fast machine cannot finish them first.
LONG = 100


def training_with_workers(out: Path, group: bool = False) -> tuple[subprocess.Popen, list[int]]:
    """A long ``pipeoptim train digits`` over 3 stages, once it has saved a checkpoint, and the
    pids of its 3 workers."""
    proc = start_training(out, epochs=LONG, group=group)
    assert wait_for(lambda: (out / "checkpoint.pt").exists() or proc.poll() is not None, 120)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    workers = children(proc.pid)
    assert len(workers) == 3, workers
    return proc, workers


@pytest.mark.slow
def test_killed_stage_during_cli_training_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, workers = training_with_workers(out)
    os.kill(workers[2], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-2000:]
    assert "stage 2" in err and "Traceback" not in err, err[-2000:]
    assert not any(alive(pid) for pid in workers)
    saved = read_checkpoint(out / "checkpoint.pt")  # intact
    assert saved["mini_batches"] % 10 == 0 or saved["mini_batches"] % 44 == 0
    metrics = json.loads((out / "metrics.json").read_text())  # written as the run stopped
    assert metrics["status"] == "failed" and "stage 2" in metrics["error"]
    rows = (out / "train.csv").read_text().splitlines()[1:]
    assert len(rows) >= saved["mini_batches"]  # rows up to the last append survive
    assert [int(r.split(",")[0]) for r in rows] == list(range(len(rows)))
    resumed = start_training(out, "--resume", str(out))  # with 3 epochs: the schedule follows
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resumed from {out / 'checkpoint.pt'} at mini-batch {saved['mini_batches']}" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 3 and metrics["mini_batches"] == 3 * 44


@pytest.mark.slow
def test_ctrl_c_in_the_driver_ends_every_worker(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, workers = training_with_workers(out, group=True)
    servers = fork_servers(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the driver and every worker
    _, err = proc.communicate(timeout=60)
    assert stopped_by_ctrl_c(proc.returncode), err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert wait_for(lambda: not any(alive(pid) for pid in workers + servers), 10)
    read_checkpoint(out / "checkpoint.pt")
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_the_run_as_ctrl_c_does(tmp_path: Path) -> None:
    """SIGTERM (kill, timeout, Slurm, docker stop) to the driver alone: the run stops every
    worker and records itself interrupted, exiting with 143 as the signal's default does; it
    exited at once, leaving metrics.json 'running' for good (and then with 130, Ctrl-C's)."""
    out = tmp_path / "run"
    proc, workers = training_with_workers(out)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted: no stage is left running" in err and "Traceback" not in err, err[-2000:]
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 10)
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_killed_driver_leaves_no_worker_behind(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup in the driver: its workers (children of the fork server, not of
    the driver) notice that it is gone and exit, and so does the server."""
    proc, workers = training_with_workers(tmp_path / "run")
    servers = fork_servers(proc.pid)
    proc.kill()
    proc.communicate(timeout=30)
    assert wait_for(lambda: not any(alive(pid) for pid in workers + servers), 20)


def stopped_by_ctrl_c(returncode: int) -> bool:
    """Whether ``python -m pipeoptim`` exited as after a Ctrl-C: with 130, or by the signal
    itself (-SIGINT; a shell reports 130 for both). In about 1 of 10 Ctrl-Cs in the first
    seconds, a ``-m`` run printed its line and then ended by the signal: Python's flag for an
    unhandled KeyboardInterrupt (bpo-1054041), which an ``exec`` of a string that the Ctrl-C cut
    short sets, was found still set at exit."""
    return returncode in (130, -signal.SIGINT)


def console_script() -> str:
    """The installed ``pipeoptim`` console script beside this Python (skips where there is none)."""
    found = shutil.which("pipeoptim", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"no pipeoptim console script beside {sys.executable}: pip install -e . installs it")
    return found


@pytest.mark.parametrize("how", ["module", "script"])
def test_ctrl_c_while_torch_is_imported(tmp_path: Path, how: str) -> None:
    """A terminal's Ctrl-C in the first second or two of ``pipeoptim train``, while torch is
    imported and before any command runs: one line, exit 130 and, with ``--json``, the object
    a later Ctrl-C prints (it printed Python's KeyboardInterrupt traceback from inside torch's
    import and nothing on stdout)."""
    program = ("-m", "pipeoptim") if how == "module" else (console_script(),)
    proc = start_training(tmp_path / "run", "--json", group=True, program=program)
    # torch's library is mapped early in its import, which goes on for a second or more
    assert wait_for(lambda: torch_loaded(proc.pid) or proc.poll() is not None, 60)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert stopped_by_ctrl_c(proc.returncode), err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted"), err[-2000:]
    assert json.loads(out) == {"error": "interrupted", "exit_code": 130}
    assert not (tmp_path / "run" / "metrics.json").exists()


def run_program(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Python program ``code`` run in ``cwd`` with this checkout's pipeoptim, Ctrl-C delivered
    as from a terminal; its exit and output."""
    with ctrl_c_delivered():
        return subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


#: a Python program that sends itself a Ctrl-C as ``module`` starts being imported (the first
#: time only), then runs ``pipeoptim partition mlp --gpus 2 --json`` as the console script does
_CTRL_C_AT_IMPORT = """
import signal, sys

class CtrlC:
    fired = False

    def find_spec(self, name, path=None, target=None):
        if name == {module!r} and not CtrlC.fired:
            CtrlC.fired = True
            signal.raise_signal(signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
sys.argv = ["pipeoptim", "partition", "mlp", "--gpus", "2", "--stages", "2", "--json"]
from pipeoptim.cli.entry import main
main()
"""


@pytest.mark.parametrize("module", ["numpy._core", "numpy.linalg", "highspy", "torch._inductor.utils"])
def test_ctrl_c_inside_an_import_that_swallows_it(tmp_path: Path, module: str) -> None:
    """A Ctrl-C that lands in numpy's import (which torch's C code starts, discarding its
    failure) or in ``import highspy`` (under a bare ``except:`` in pulp) was lost: the run
    planned the model and exited 0 (``numpy._core``, ``highspy``) or failed later on a
    half-loaded numpy (``numpy.linalg``: ``module 'numpy' has no attribute 'matrix'``). One in
    torch's dynamo, which torch imports as it builds the first optimizer (a command's first
    second), ended in ``partially initialized module 'torch._dynamo' has no attribute 'utils'``
    (``torch._inductor.utils``): the entry imports it with the command line. Now it is held
    until that import has ended, then ends the run."""
    done = run_program(_CTRL_C_AT_IMPORT.format(module=module), tmp_path)
    assert stopped_by_ctrl_c(done.returncode), done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == ["interrupted while starting: nothing was run"], done.stderr
    assert json.loads(done.stdout) == {"error": "interrupted", "exit_code": 130}


#: ``pipeoptim partition mlp --gpus 2 --json`` as the console script runs it, with a Ctrl-C
#: sent by the code of ``when``
_CTRL_C_WHEN = """
import atexit, signal, sys
import click

if {when!r} == "click starts":
    start = click.Context.__init__

    def context(self, *args, **kwargs):
        click.Context.__init__ = start
        signal.raise_signal(signal.SIGINT)
        start(self, *args, **kwargs)

    click.Context.__init__ = context
else:  # at exit, after the command has printed its result, before torch's exit hooks
    import pipeoptim.cli.main

    atexit.register(signal.raise_signal, signal.SIGINT)
sys.argv = ["pipeoptim", "partition", "mlp", "--gpus", "2", "--stages", "2", "--json"]
from pipeoptim.cli.entry import main
main()
"""


def test_ctrl_c_while_click_starts_stops_the_command(tmp_path: Path) -> None:
    """After the import and before the command (click reading the environment, parsing the
    options): it printed a traceback and exited by the signal, or click's "Aborted!" with 1."""
    done = run_program(_CTRL_C_WHEN.format(when="click starts"), tmp_path)
    assert stopped_by_ctrl_c(done.returncode), done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == ["interrupted: no plan was saved"], done.stderr
    assert json.loads(done.stdout) == {"error": "interrupted", "exit_code": 130}
    assert not (tmp_path / "profiles").exists()


def test_ctrl_c_after_the_command_has_ended_leaves_its_result(tmp_path: Path) -> None:
    """A Ctrl-C as the interpreter exits, after a complete run (helper-113 sent it 1.05-1.14 s
    into a 1.1 s partition): the process ended by the signal, or exited 0 with a traceback from
    torch's exit hooks. The stages are forced: the planner chose 1 stage x 2 replicas for
    this MLP once on a loaded host (helper-181)."""
    done = run_program(_CTRL_C_WHEN.format(when="exit"), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "KeyboardInterrupt" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["num_stages"] == 2


def torch_loaded(pid: int) -> bool:
    """Whether process ``pid`` has torch's C++ library mapped (False once it has ended)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_while_the_workers_start(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_training(out, epochs=LONG, group=True)
    # the first pipeline of the driver also starts the fork server (importing torch): a
    # Ctrl-C as its workers appear comes while they start or just after
    assert wait_for(lambda: len(children(proc.pid)) == 3 or proc.poll() is not None, 120)
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert stopped_by_ctrl_c(proc.returncode), err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted"), err[-2000:]
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 10)


@pytest.mark.slow
def test_ctrl_c_while_measuring_the_machine(tmp_path: Path) -> None:
    """A terminal's Ctrl-C while `pipeoptim train` measures this machine's link and runtime:
    one line, exit 130, nothing cached, no process left (it printed a c10d stack dump and
    KeyboardInterrupt tracebacks of the measuring processes)."""
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    proc = start_training(out, group=True, env={"PIPEOPTIM_CACHE_DIR": str(cache)})
    first = proc.stderr.readline()
    assert first.startswith("measuring this machine's link and runtime overhead"), first
    time.sleep(1.0)  # inside the measurement (about 7 s)
    servers = fork_servers(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert stopped_by_ctrl_c(proc.returncode), err[-2000:]
    assert "interrupted while measuring this machine's link and runtime costs: nothing was saved" in err
    assert "Traceback" not in err and "c10d" not in err, err[-2000:]
    assert not (cache / "machine-costs.json").exists()
    assert wait_for(lambda: not children(proc.pid) and not any(alive(pid) for pid in servers), 10)


@pytest.mark.parametrize("width", [8, 512])
def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path: Path, width: int) -> None:
    """Width 512 makes the pipeline spec (~2 MB) larger than a pipe's buffer: sent as a process
    argument it blocked the driver's start for ever once the first worker had died."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import torch, torch.nn.functional as F, pipeoptim\n"
        f"model = torch.nn.Sequential(torch.nn.Linear(8, {width}), torch.nn.ReLU(), "
        f"torch.nn.Linear({width}, {width}), torch.nn.ReLU(), torch.nn.Linear({width}, 2))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "pipe = pipeoptim.compile(model, opt, 2, example_inputs=torch.randn(4, 8), "
        f"loss_fn=F.cross_entropy, profile_dir={str(tmp_path)!r}, timeout=60)\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "died with exit code 1" in result.stderr
    assert "can only join a started process" not in result.stderr  # the worker's own cleanup
    assert "if __name__ == '__main__':" in result.stderr.splitlines()[-1]


def test_a_crash_while_writing_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"epoch": 1})

    def crash(f):
        f.write(b'{"epoch": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {})
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    assert (
        (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640
    )


def test_an_atomic_write_syncs_the_file_and_then_its_folder(tmp_path: Path, monkeypatch) -> None:
    """The rename is an entry of the folder: synced only with the file, a crash of the host
    could leave the folder without the new name (or with neither file)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_json(tmp_path / "plan.json", {"stages": 2})
    assert synced == ["file", "folder"]
    assert json.loads((tmp_path / "plan.json").read_text()) == {"stages": 2}


def test_a_killed_writer_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save({"v": 1}, path)
    script = (
        f"import sys, os, signal; sys.path.insert(0, {str(ROOT)!r})\n"
        "from pipeoptim.fileio import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'x' * 1000000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write({str(path)!r}, write)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert torch.load(path) == {"v": 1}
    # its hidden temporary (1 MB here; a checkpoint's size in use) goes at a later write of the
    # file once unwritten for a minute; one a writer holds (locked), a fresh one, and a folder
    # or a sibling file that look like one stay
    (left,) = tmp_path.glob(".big.pt.*.tmp")
    assert left.stat().st_size == 1_000_000
    atomic_write(path, lambda f: torch.save({"v": 2}, f))
    assert left.exists()  # it could be a writer's that has just created it
    old = time.time() - 2 * STALE_SECONDS
    os.utime(left, (old, old))
    held, fresh, folder = (tmp_path / f".big.pt.{tag}.tmp" for tag in ("held0000", "fresh000", "folder00"))
    held.write_bytes(b"x")
    fresh.write_bytes(b"x")
    folder.mkdir()
    sibling = tmp_path / ".big.pt.bak"
    sibling.write_bytes(b"x")
    for p in (held, folder, sibling):
        os.utime(p, (old, old))
    with open(held, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another open of the file: as another process's lock
        atomic_write(path, lambda f: torch.save({"v": 3}, f))
    assert torch.load(path) == {"v": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["big.pt", held.name, fresh.name, folder.name, sibling.name]
    )


def test_an_atomic_write_of_a_name_of_255_bytes_works(tmp_path: Path) -> None:
    """The temporary adds 14 bytes to the name: a name of 242 bytes or more failed with
    ENAMETOOLONG, naming the temporary (helper-89)."""
    path = tmp_path / ("é" * 127 + "x")  # 255 bytes in UTF-8
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_atomic_write_through_a_symbolic_link_writes_its_target(tmp_path: Path) -> None:
    """A rename onto the link replaced ``latest.json -> runs/7/plan.json`` with a file: the
    target kept the old contents and the link was gone. Chains of links and a link to a file
    not there yet (in a folder that is) are written through too, like a plain open."""
    (tmp_path / "runs" / "7").mkdir(parents=True)
    target = tmp_path / "runs" / "7" / "plan.json"
    target.write_text('{"stages": 1}')
    link, chain = tmp_path / "latest.json", tmp_path / "current.json"
    link.symlink_to(Path("runs") / "7" / "plan.json")  # relative, as `ln -s` makes them
    chain.symlink_to("latest.json")
    write_json(link, {"stages": 2})
    assert link.is_symlink() and json.loads(target.read_text()) == {"stages": 2}
    write_json(chain, {"stages": 3})
    assert chain.is_symlink() and link.is_symlink() and json.loads(target.read_text()) == {"stages": 3}
    dangling = tmp_path / "next.json"  # a link to a file not there yet, in a folder that is
    dangling.symlink_to(Path("runs") / "7" / "next.json")
    write_json(dangling, {"stages": 4})
    assert dangling.is_symlink() and json.loads((tmp_path / "runs" / "7" / "next.json").read_text()) == {
        "stages": 4
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.json", "latest.json", "next.json", "runs"]
    assert sorted(p.name for p in (tmp_path / "runs" / "7").iterdir()) == ["next.json", "plan.json"]


def test_an_atomic_write_through_a_bad_link_fails_as_open_does(tmp_path: Path) -> None:
    """Loops, links into a missing folder and links to a folder: a loop was replaced by a file,
    a dangling link's folders were created, and a folder's error named the temporary
    (helper-92). Each now raises what a plain open raises, naming the path, and leaves the
    links and folders as they were."""
    loop, a, b = tmp_path / "loop.json", tmp_path / "a.json", tmp_path / "b.json"
    loop.symlink_to("loop.json")
    a.symlink_to("b.json")
    b.symlink_to("a.json")
    (tmp_path / "looped").symlink_to("looped")
    (tmp_path / "folder").mkdir()
    (tmp_path / "to_folder").symlink_to("folder")
    (tmp_path / "nowhere.json").symlink_to(Path("missing") / "sub" / "t.json")
    (tmp_path / "gone").symlink_to("missing")
    cases = {
        loop: OSError,
        a: OSError,
        tmp_path / "looped" / "f.json": OSError,
        tmp_path / "to_folder": IsADirectoryError,
        tmp_path / "nowhere.json": FileNotFoundError,
        tmp_path / "gone" / "f.json": FileNotFoundError,
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for path, error in cases.items():
        with pytest.raises(error) as plain:
            open(path, "w").close()
        with pytest.raises(error) as ours:
            write_json(path, {})
        assert ours.value.errno == plain.value.errno, path
        assert ours.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert loop.is_symlink() and a.is_symlink() and b.is_symlink()
    assert list((tmp_path / "folder").iterdir()) == []


def _running(pid: int) -> bool:
    """Whether ``pid`` names a live process (not a zombie awaiting its parent's wait)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc")
def test_workers_stop_when_their_driver_is_killed(tmp_path: Path) -> None:
    """A driver killed outright (kill -9, the out-of-memory killer) runs no clean-up: its
    three workers, the fork server and the resource tracker lived on for minutes (helper-92),
    each worker holding its stage's memory. Now every worker stops within seconds."""
    driver = subprocess.Popen(
        [sys.executable, "-m", "tests.killed_driver_script", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in driver.stdout.readline().split()]
        assert len(workers) == 3, driver.stderr.read()
        assert all(_running(pid) for pid in workers)
        time.sleep(5)  # in the middle of steps
        driver.kill()
        driver.wait(timeout=30)
        assert not _outlived(workers), "workers outlived their driver"
        # the first to notice says why; a stage whose neighbour left first may stop on that
        assert f"the driver process {driver.pid} has exited; stopping" in driver.stderr.read()
    finally:
        _end(driver, workers)


def _outlived(pids: list[int], seconds: float = 15.0) -> list[int]:
    """Those of ``pids`` still running after ``seconds`` (less once none is)."""
    deadline = time.monotonic() + seconds
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if _running(pid)]


def _end(starter: subprocess.Popen, pids: list[int]) -> None:
    """Kill ``starter`` and the processes ``pids`` (a test's clean-up, whatever it found)."""
    starter.kill()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_children_of_run_processes_stop_with_their_starter(tmp_path: Path, stop: int) -> None:
    """The children of :func:`run_processes` (this machine's link measured by ``pipeoptim train``,
    the benchmarks' ranks) end once the process that started them is gone: a benchmark stopped
    by a SIGTERM, which ends a Python process without clean-up, left its ranks running for an
    hour (they start with SIGTERM blocked, so the signal never reached them)."""
    starter = subprocess.Popen(
        [sys.executable, "-m", "tests.killed_measure_script", str(tmp_path)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
            assert starter.poll() is None, starter.stderr.read()
            time.sleep(0.1)
        time.sleep(0.2)  # both ids written
        children = [int(f.read_text()) for f in tmp_path.glob("*.pid")]
        assert len(children) == 2 and all(_running(pid) for pid in children)
        os.kill(starter.pid, stop)
        starter.wait(timeout=30)
        assert not _outlived(children), "children outlived their starter"
        assert f"the driver process {starter.pid} has exited; stopping" in starter.stderr.read()
    finally:
        _end(starter, children)


def test_run_processes_kills_every_child_before_it_waits_for_one() -> None:
    """On a failure or Ctrl-C every child is killed before any is joined: killed and joined one
    by one, the second of the link measurement's two children saw the first's connection
    close in its all-reduce and printed a traceback before its own kill (helper-166)."""
    import queue

    from pipeoptim.runtime.spawning import run_processes

    calls: list[tuple[str, int]] = []

    class Child:
        def __init__(self, target: Any, args: tuple) -> None:
            self.index, self.pid, self.exitcode = args[1], None, None

        def start(self) -> None:
            self.pid = 1000 + self.index
            self.exitcode = 1 if self.index == 0 else None  # the first fails at once

        def kill(self) -> None:
            calls.append(("kill", self.index))

        def join(self, timeout: float) -> None:
            calls.append(("join", self.index))

        def is_alive(self) -> bool:
            return False

    class Empty:
        def get(self, timeout: float) -> None:
            raise queue.Empty

    context = types.SimpleNamespace(Queue=Empty, Process=lambda target, args: Child(target, args))
    with pytest.raises(RuntimeError, match="process 0 exited with code 1"):
        run_processes(print, [(i,) for i in range(3)], "three children", context=context)  # type: ignore[arg-type]
    assert calls == [("kill", 0), ("kill", 1), ("kill", 2), ("join", 0), ("join", 1), ("join", 2)]


def test_a_driver_whose_id_names_another_process_now_counts_as_gone() -> None:
    me = multiprocessing.current_process()
    assert driver_alive(me, process_start_time(os.getpid()))
    assert not driver_alive(me, "0")  # the id, but another start: a process that reused it
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = types.SimpleNamespace(pid=int(done.stdout))  # a process that has exited (and been waited for)
    assert not driver_alive(gone, None)  # type: ignore[arg-type]


def _fail_and_close(executor: str) -> tuple[Any, Any]:
    """A pipeline whose loss_fn raises at mini-batch 3 (a class label out of range), with
    mini-batches in flight, closed; weak references to it and to its first stage's module."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 4),
    )
    x, y = torch.randn(8, 32), torch.randint(0, 4, (8,))
    pipe = pipeoptim.compile(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        gpus=2,
        method="pipeoptim",
        example_inputs=x,
        loss_fn=F.cross_entropy,
        executor=executor,
        profile_dir=None,
    )
    with pytest.raises((IndexError, PipelineError), match="out of bounds"):
        for i in range(8):
            float(pipe.step(x, torch.full_like(y, 99) if i == 3 else y))
    pipe.close()
    stage = pipe._executor.stages[0].module if executor == "local" else pipe
    return weakref.ref(pipe), weakref.ref(stage)


@pytest.mark.parametrize("executor", ["local", "processes"])
def test_a_failed_pipeline_is_freed_with_its_pipes_and_threads(executor: str) -> None:
    """Closing a pipeline after a failure releases everything: before, each failed pipeline
    kept its stages, weights and activations (about 380 MiB for one of 4 Linear layers of
    2048, so a retry loop ran out of memory), and with worker processes 2 pipes and a queue
    thread. Three causes: a torch future holding the error (the garbage collector cannot see
    into it), the saved-tensor hooks' outputs holding their own autograd node (a cycle through
    C++), and the command queues never closed."""
    import gc

    refs = [_fail_and_close(executor)]  # the first also starts what lasts (multiprocessing's tracker)
    gc.collect()
    threads, fds = set(threading.enumerate()), len(os.listdir("/proc/self/fd"))
    refs += [_fail_and_close(executor) for _ in range(2)]
    gc.collect()
    assert [r() for pair in refs for r in pair] == [None] * 6
    # no thread started since is left (counting them failed once in a loaded full run, 5 == 6:
    # a thread of an earlier test had ended meanwhile; helper-95); a queue's feeder thread ends
    # a moment after close(), once it finds the stage gone (once still running in a full run)
    assert wait_for(lambda: [t.name for t in threading.enumerate() if t not in threads] == [], 5), [
        t.name for t in threading.enumerate() if t not in threads
    ]
    # none more open (fewer once in a full run, 32 against 34: an earlier test's closed meanwhile)
    assert len(os.listdir("/proc/self/fd")) <= fds


class RaisesLateWhenArmed(torch.nn.Module):
    """A layer that, once ``flag`` exists, raises ValueError a second into its forward."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.path.exists(self.flag):
            time.sleep(1.0)  # the driver is waiting for room by then
            raise ValueError("armed")
        return self.lin(x)


def test_a_stage_error_met_while_step_waits_for_room_is_said_as_itself(tmp_path: Path) -> None:
    """A loop that never reads its losses meets a stage's failure in step()'s wait for room:
    its first report read "the pipeline stopped at an earlier error (...)", an error never
    raised before (helper-130)."""
    flag = tmp_path / "armed"
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), RaisesLateWhenArmed(str(flag)))
    options = {"loss_fn": F.mse_loss, "executor": "processes", "profile_dir": None, "leaf_modules": ["2"]}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pipeoptim.compile(model, opt, 2, example_inputs=torch.randn(8, 8), **options) as pipe:
        pipe.step(torch.randn(8, 8), torch.randn(8, 8)).wait()
        flag.write_text("")
        with pytest.raises(PipelineError) as info:
            for _ in range(3 * pipe.max_in_flight):
                pipe.step(torch.randn(8, 8), torch.randn(8, 8))  # losses never read
        assert str(info.value).startswith("stage 1 failed: ValueError: armed"), str(info.value)
