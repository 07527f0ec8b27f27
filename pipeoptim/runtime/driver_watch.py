"""A worker process stops when the driver that started it is gone.

A driver killed outright (``kill -9``, the kernel's out-of-memory killer) runs no clean-up:
its stage workers, forked from the fork server rather than from the driver, are not its
children, and ``multiprocessing.parent_process().is_alive()`` stays true there, because the
fork server's sentinel it reads is held open by the workers themselves. Such workers lingered
for minutes (blocked in a receive until the transport's timeout, then in writing their error
to a queue nobody reads), each holding its stage's memory; the fork server and the resource
tracker stayed with them. :func:`exit_when_driver_dies` watches the driver's process id from
a daemon thread and ends the worker within a second of the driver's end.

The other way round, a worker must stop at once when its driver stops it
(:func:`stop_on_driver_sigterm`), and only then: workers start with SIGTERM blocked, so that a
SIGTERM sent to the whole process group (a job scheduler's, a container stop's) reaches the
driver alone, which stops the run in order.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.process import BaseProcess

#: seconds between two looks at the driver
INTERVAL = 1.0


def process_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), which
    tells the driver from a later process that reuses its id; ``None`` where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the name in () may hold spaces


def driver_alive(driver: BaseProcess, started: str | None) -> bool:
    """Whether the process ``driver`` is still the one that started this worker.

    POSIX: its id still names a process (``kill(pid, 0)``) with the same start time where
    ``/proc`` tells it; elsewhere, ``driver.is_alive()`` (a spawned child's parent sentinel).
    """
    if os.name != "posix":
        return driver.is_alive()
    pid = driver.pid
    assert pid is not None
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's process has the id now
        return False
    return started is None or process_start_time(pid) == started


def exit_when_driver_dies(name: str, driver: BaseProcess | None, interval: float = INTERVAL) -> None:
    """Start a daemon thread that ends this process (exit code 1, one line on stderr naming
    ``name``) once ``driver`` has exited; nothing where there is no driver (``None``)."""
    if driver is None or driver.pid is None:
        return
    started = process_start_time(driver.pid)

    def watch() -> None:
        while driver_alive(driver, started):
            time.sleep(interval)
        sys.stderr.write(f"pipeoptim: {name}: the driver process {driver.pid} has exited; stopping\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="pipeoptim-driver-watch", daemon=True).start()


def stop_on_driver_sigterm(driver: BaseProcess | None) -> None:
    """End this process on a SIGTERM from ``driver`` (``Process.terminate()``), as its default
    action would, and ignore one from any other sender.

    Call it in the main thread. Blocks SIGTERM in it (every thread started later inherits the mask) and
    waits for it in a daemon thread (``sigwaitinfo``, which names the sender). Before, the
    workers only inherited the driver's blocked SIGTERM from their start
    (:func:`pipeoptim.runtime.spawning.signals_deferred`), so ``terminate()`` did nothing: a
    stage failure under an asynchronous method reached the user after the driver's full 5 s
    grace, when ``kill()`` ended the stages blocked in a receive (helper-98). Nothing where
    there is no driver (``None``) or no ``sigwaitinfo`` (not POSIX).
    """
    if driver is None or driver.pid is None or not hasattr(signal, "sigwaitinfo"):
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # its default action: end the process
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    pid = driver.pid

    def watch() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != pid:
            continue  # another sender's: the driver stops the run
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # this thread takes it
        os.kill(os.getpid(), signal.SIGTERM)  # ends the process by the signal: exit code -15

    threading.Thread(target=watch, name="pipeoptim-sigterm-watch", daemon=True).start()


def follow_driver(name: str) -> BaseProcess | None:
    """Make this child process follow the one that started it (its driver): Ctrl-C ignored (a
    terminal's reaches the whole process group, and the driver stops its children), SIGTERM
    obeyed from the driver alone (:func:`stop_on_driver_sigterm`), and an end within a second
    of the driver's (:func:`exit_when_driver_dies`, ``name`` in its line). Call it first in the
    child's main thread: every thread started later has SIGTERM blocked. Returns the driver
    (``None`` in a process no ``multiprocessing`` started)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    driver = multiprocessing.parent_process()
    stop_on_driver_sigterm(driver)
    exit_when_driver_dies(name, driver)
    return driver
