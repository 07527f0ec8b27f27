"""How much of this process's cores other processes took over a span of time (Linux ``/proc``).

A measurement or a training epoch on a 2-core machine runs slower where other work shares the
cores: gloo's latency measured 834 us beside one busy process against 90-456 us idle, and
``pipeoptim train``'s epochs ran at 0.54-0.71 of the plan while a test suite ran beside them.
:class:`OtherWork` counts, from its creation, the CPU time ``/proc/stat`` shows as not idle on
the cores this process may run on, less the CPU time of this job's own processes (this process
and its descendants, ``/proc/<pid>/stat``; under torchrun every rank its agent started), and
gives it as a share of those cores' time.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeoptim.runtime.spmd import under_torchrun

#: share of the cores' time other processes may take before a figure measured meanwhile is
#: called into question: on 2 cores more than a quarter means one of two busy processes of
#: ours shared its core for over half of the time
OTHER_WORK_LIMIT = 0.25


class OtherWork:
    """The share of the usable cores' time other processes have taken since construction.

    Args:
        root: the process whose descendants are this job's (default: this one; under
            torchrun its agent, the parent of every local rank).

    Raises:
        OSError: ``/proc`` cannot be read (not Linux).
    """

    def __init__(self, root: int | None = None) -> None:
        if root is None:
            root = os.getppid() if under_torchrun() else os.getpid()
        self.root = root
        self.cores = sorted(os.sched_getaffinity(0))
        self._busy, self._total = cpu_jiffies(self.cores)
        self._own = own_jiffies(self.root)

    def share(self) -> float:
        """Other processes' share of the cores' time since construction (0 to 1)."""
        busy, total = cpu_jiffies(self.cores)
        own = own_jiffies(self.root) - self._own
        total -= self._total
        return max(0.0, min(1.0, (busy - self._busy - own) / total)) if total > 0 else 0.0


def available() -> bool:
    """Whether :class:`OtherWork` can count here (``/proc/stat`` and CPU affinity)."""
    return Path("/proc/stat").exists() and hasattr(os, "sched_getaffinity")


def cpu_jiffies(cores: list[int]) -> tuple[int, int]:
    """Busy (not idle, not iowait) and total jiffies so far of ``cores``, from ``/proc/stat``."""
    wanted = {f"cpu{c}" for c in cores}
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name in wanted:
            fields = [int(v) for v in values]
            total += sum(fields[:8])  # user .. steal; guest time is counted in user already
            busy += sum(fields[:8]) - fields[3] - fields[4]
    return busy, total


def own_jiffies(root: int) -> int:
    """CPU jiffies (user and system) of ``root`` and its descendants, the ended ones included
    (each process's own and its reaped children's): measuring workers are started by
    multiprocessing's fork server, whose children ``getrusage`` of this process never counts."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after the command name: state, ppid, ...
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        times[pid] = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    ours = {root}
    while found := {pid for pid, parent in parents.items() if parent in ours} - ours:
        ours |= found
    return sum(times.get(pid, 0) for pid in ours)
