"""OtherWork: other processes' share of this process's cores, this job's own work left out."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection

import pytest

from pipeoptim import other_work
from pipeoptim.other_work import OtherWork

pytestmark = pytest.mark.skipif(not other_work.available(), reason="reads /proc")

SPIN = "import time\nend = time.time() + 1.2\nwhile time.time() < end: pass"


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_the_counts_come_from_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Busy jiffies of the usable cores, less this job's own, over those cores' time."""
    cpu = iter([(100, 1000), (190, 1100)])  # the usable cores: 90 jiffies busy of 100
    own = iter([50, 80])  # this job's: 30 of them
    monkeypatch.setattr(other_work, "cpu_jiffies", lambda cores: next(cpu))
    monkeypatch.setattr(other_work, "own_jiffies", lambda root: next(own))
    assert OtherWork().share() == pytest.approx(0.6)
    cpu, own = iter([(100, 1000), (100, 1000)]), iter([50, 50])  # no time has passed
    assert OtherWork().share() == 0.0


def test_cpu_jiffies_reads_only_the_usable_cores() -> None:
    cores = sorted(os.sched_getaffinity(0))
    busy, total = other_work.cpu_jiffies(cores)
    assert 0 <= busy <= total
    assert other_work.cpu_jiffies([]) == (0, 0)
    assert other_work.cpu_jiffies(cores[:1])[1] <= total


def _spin_and_say(seconds: float, cpu: Connection) -> None:
    _spin(seconds)
    cpu.send(time.process_time())  # all of this process's, its start-up's imports included


def test_this_jobs_own_work_is_left_out() -> None:
    """Its own process and a forked child, each busy 0.6 s: the share leaves out exactly their
    CPU time (each process's own clock) from what the cores were busy with meanwhile, whatever
    else runs beside (a neighbour's work is in both; the test compared two spans before, and
    failed where a test suite's neighbour worked in one of them)."""
    cores = sorted(os.sched_getaffinity(0))
    context = multiprocessing.get_context("fork")  # spawn starts a resource tracker, ours too
    cpu, sending = context.Pipe(duplex=False)
    child = context.Process(target=_spin_and_say, args=(0.6, sending))
    busy, total = other_work.cpu_jiffies(cores)
    meter = OtherWork()
    mine = time.process_time()
    child.start()
    _spin(0.6)
    child.join()
    mine = time.process_time() - mine
    share = meter.share()
    busy_after, total_after = other_work.cpu_jiffies(cores)
    ours = (mine + cpu.recv()) * os.sysconf("SC_CLK_TCK") / (total_after - total)
    left_out = (busy_after - busy) / (total_after - total) - share
    assert left_out == pytest.approx(ours, abs=0.08), (left_out, ours, share)


def test_other_processes_are_counted() -> None:
    """Busy processes that are not this job's (their shell exits at once, so they are no
    descendants) started after the meter: the 0.25 s snapshot taken before measuring saw none."""
    cores = len(os.sched_getaffinity(0))
    if cores > 8:
        pytest.skip(f"keeping {cores} cores busy is too much for a test")
    meter = OtherWork()
    for _ in range(cores):
        subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" >/dev/null 2>&1 &', SPIN], check=True)
    time.sleep(1.0)
    share = meter.share()
    time.sleep(0.3)  # until they have ended
    assert share > 0.5
