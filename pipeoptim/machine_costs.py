"""This machine's link and runtime costs for the plan's cost model, measured once and cached.

A plan priced with the compute alone predicted ``pipeoptim train digits`` at 483
mini-batches/s on the project's 2-core CPU machine; it ran at 114-161: each message pays the
transport's latency and each action the runtime's own CPU time, which a small model's
compute does not hide. :func:`load_or_measure_machine_costs` measures both on the CPU
(gloo's α and β by :func:`pipeoptim.runtime.linkcost.measure_link`, the overhead per action by
:func:`pipeoptim.action_overhead.measure_action_overhead`, a few seconds together) and keeps
them in ``machine-costs.json`` of :func:`cache_dir` under the host, its cores, the torch
version and how they were measured, so that every later plan on this machine gets the same
figures (a plan must not change with timing noise).
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch

from pipeoptim.action_overhead import measure_action_overhead
from pipeoptim.fileio import read_json_table, write_json
from pipeoptim.runtime.distributed import STAGE_THREADS
from pipeoptim.runtime.linkcost import measure_link, usable_cores

#: environment variable naming the cache folder (default: $XDG_CACHE_HOME/pipeoptim, ~/.cache/pipeoptim)
CACHE_ENV = "PIPEOPTIM_CACHE_DIR"
MACHINE_COSTS_FILE = "machine-costs.json"
#: how the figures are measured; figures saved under another method are measured again
METHOD = "gloo: median of 3 fits of round trips 4K-8M; overhead: 2 stages, 200 mini-batches, CPU time"
T = TypeVar("T")


class MachineCosts(NamedTuple):
    """A CPU pipeline's costs beyond its compute on this machine."""

    latency: float  # seconds per message between stages (α)
    bandwidth: float  # bytes per second between stages (1/β)
    action_overhead: float  # the runtime's CPU seconds per action (forward, backward, step)


def cache_dir() -> Path:
    """``$PIPEOPTIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pipeoptim``, else ``~/.cache/pipeoptim``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pipeoptim"


def machine_key() -> str:
    """What the figures depend on: host, the cores this process may use, torch, threads per stage."""
    cores = usable_cores()
    return json.dumps(
        {
            "host": socket.gethostname(),
            "cores": cores,
            "torch": torch.__version__,
            "stage threads": STAGE_THREADS,
            "method": METHOD,
        },
        sort_keys=True,
    )


def measure_machine_costs(links: int = 3) -> MachineCosts:
    """gloo's latency and bandwidth between two processes and the runtime's overhead per action,
    measured now (a few seconds). The link is measured ``links`` times and the median α and β
    kept: it is timed on the wall clock, and one measurement's α varied 75-356 us on an idle
    2-core machine. The overhead is CPU time, which other processes inflate less than wall
    time, but still: 0.94 ms per action with four busy loops running against 0.60-0.70 idle.

    Raises:
        ValueError: the link timings were noise three times in a row (a machine too busy).
        RuntimeError, PipelineError: a measuring process failed or did not answer.
    """
    alphas, betas = zip(*(measure_link("gloo") for _ in range(links)))
    return MachineCosts(statistics.median(alphas), 1.0 / statistics.median(betas), measure_action_overhead())


def load_or_measure_machine_costs(
    cache: str | Path | None = None, log: Callable[[str], None] = lambda _msg: None
) -> MachineCosts:
    """:func:`measure_machine_costs`, remembered in ``<cache>/machine-costs.json`` (``cache``
    defaults to :func:`cache_dir`) under :func:`machine_key`; measured again for another
    host, core count, torch version or method, or where the file is unreadable (logged).

    Raises:
        what :func:`measure_machine_costs` raises.
    """
    path = Path(cache if cache is not None else cache_dir()) / MACHINE_COSTS_FILE
    key = machine_key()
    table = read_json_table(path, "measuring this machine's link and runtime overhead again", log)
    saved = table.get(key)
    if (
        isinstance(saved, dict)
        and set(saved) == set(MachineCosts._fields)
        and all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in saved.values())
    ):
        return MachineCosts(**saved)
    log("measuring this machine's link and runtime overhead (once; a few seconds)")
    costs, load = with_other_work(measure_machine_costs)
    table[key] = costs._asdict()
    figures = (
        f"latency {costs.latency * 1e6:.0f} us, bandwidth {costs.bandwidth / 1e9:.2f} GB/s, "
        f"runtime overhead {costs.action_overhead * 1e3:.3f} ms per action"
    )
    again = f"delete {path} to measure again when it is idle"
    try:
        write_json(path, table)
    except OSError as exc:
        again = "the next run measures again"
        log(
            f"measured {figures}, but could not save them in {path} ({exc}): every run measures again; "
            f"set {CACHE_ENV} to a writable folder"
        )
    else:
        log(f"saved {path}: {figures}")
    if load is not None:
        log(f"the machine was busy while measuring ({load}): the figures may be off; {again}")
    return costs


#: share of all CPU time other processes may take while the costs are measured: the
#: measurement runs two busy processes, so on 2 cores more than a quarter means one of them
#: shared its core for over half of the time
OTHER_WORK_LIMIT = 0.25


def with_other_work(measure: Callable[[], T]) -> tuple[T, str | None]:
    """``measure()``, and how busy other processes kept the cores meanwhile where they took
    over :data:`OTHER_WORK_LIMIT` of the CPU time (:func:`other_work_share`), else ``None``.
    Where ``/proc`` is absent, the 1-minute load average before measuring, where it exceeds
    half the cores (it lags and counts every process)."""
    if not Path("/proc/stat").exists():
        return measure(), _load_average()
    result, share = other_work_share(measure)
    return result, (f"other processes used {share:.0%} of the CPU time" if share > OTHER_WORK_LIMIT else None)


def other_work_share(measure: Callable[[], T]) -> tuple[T, float]:
    """``measure()`` and the share of all CPU time other processes took meanwhile: what
    ``/proc/stat`` counts as not idle over the whole measurement, less the CPU time of this
    process and its descendants (:func:`_own_cpu_seconds`, the measuring processes). A
    snapshot of 0.25 s before measuring missed a test suite running beside the measurement
    (load about 3 on 2 cores), and one busy process on 2 cores (50%) never passed its limit.

    Raises:
        OSError: ``/proc`` cannot be read (not Linux).
    """
    first, own = _cpu_times(), _own_cpu_seconds()
    result = measure()
    own = _own_cpu_seconds() - own
    total, idle = (b - a for a, b in zip(first, _cpu_times()))
    tick = os.sysconf("SC_CLK_TCK")
    return result, (max(0.0, ((total - idle) / tick - own) / (total / tick)) if total > 0 else 0.0)


def _load_average() -> str | None:
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None
    return f"load average {load:.1f} on {cores} cores" if load > cores / 2 else None


def _own_cpu_seconds() -> float:
    """CPU seconds (user and system) of this process and its descendants, the ended ones
    included (each process's own and its reaped children's, ``/proc/<pid>/stat``): the
    measuring workers are started by multiprocessing's fork server, whose children
    ``getrusage`` of this process never counts."""
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
    ours = {os.getpid()}
    grown = True
    while grown:
        found = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= found
        grown = bool(found)
    return sum(times.get(pid, 0) for pid in ours) / os.sysconf("SC_CLK_TCK")


def _cpu_times() -> tuple[int, int]:
    """All CPUs' total and idle (idle + iowait) jiffies so far, from ``/proc/stat``."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]
