"""This machine's link and runtime costs for the plan's cost model, measured once and cached.

A plan priced with the compute alone predicted ``pipeoptim train digits`` at 483
mini-batches/s on the project's 2-core CPU machine; it ran at 114-161: each message pays the
transport's latency and each action the runtime's own CPU time, which a small model's
compute does not hide. :func:`load_or_measure_machine_costs` measures both on the CPU
(gloo's α and β by :func:`pipeoptim.runtime.linkcost.measure_link`, the overhead per action by
:func:`pipeoptim.action_overhead.measure_action_overhead`), and the fixed cost and bandwidth of
the replicas' gradient all-reduce (:func:`pipeoptim.runtime.linkcost.measure_allreduce`; 4-6x
the time of a send of 8 MiB on loopback gloo), 10-20 s together, and keeps
them in ``machine-costs.json`` of :func:`cache_dir` under the host, its cores, the torch
version and how they were measured, so that every later plan on this machine gets the same
figures (a plan must not change with timing noise).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch

from pipeoptim import other_work
from pipeoptim.action_overhead import measure_action_overhead
from pipeoptim.fileio import read_json_table, update_json_table
from pipeoptim.runtime.affinity import binding_wanted
from pipeoptim.runtime.distributed import STAGE_THREADS
from pipeoptim.runtime.linkcost import measure_allreduce, measure_link, usable_cores
from pipeoptim.units import is_bandwidth, is_seconds

#: environment variable naming the cache folder (default: $XDG_CACHE_HOME/pipeoptim, ~/.cache/pipeoptim)
CACHE_ENV = "PIPEOPTIM_CACHE_DIR"
MACHINE_COSTS_FILE = "machine-costs.json"
#: a cache entry's key for when its figures were measured (ISO 8601, UTC)
MEASURED_AT = "measured_at"
#: how the figures are measured; figures saved under another method are measured again
METHOD = (
    "gloo: median of 3 relative fits of the fastest of 16 round trips 4K-8M; "
    "overhead: 2 stages, 200 mini-batches, CPU time; ranks bound to cores; "
    "all-reduce: median of 3 relative fits of the means of 32 at 64K and 8M, fixed cost per all-reduce"
)
#: the most seconds a cached latency or per-action overhead may hold, and the slowest cached
#: link (bytes/s): measured figures are near 1e-4 s and 1e9 B/s; beyond these, edited by hand
MAX_CACHED_SECONDS = 1.0
MIN_CACHED_BANDWIDTH = 1e6
T = TypeVar("T")
#: figures measured on a busy machine, by cache file and machine key: this process's only
_UNSAVED: dict[tuple[str, str], MachineCosts] = {}


class MachineCosts(NamedTuple):
    """A CPU pipeline's costs beyond its compute on this machine."""

    latency: float  # seconds per message between stages (α)
    bandwidth: float  # bytes per second between stages (1/β)
    action_overhead: float  # the runtime's CPU seconds per action (forward, backward, step)
    allreduce_bandwidth: float  # bytes per second of the replicas' ring all-reduce (CostConfig's)
    allreduce_latency: float  # seconds each all-reduce costs beyond its bytes (CostConfig's)


def cache_dir() -> Path:
    """``$PIPEOPTIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pipeoptim``, else ``~/.cache/pipeoptim``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pipeoptim"


def machine_key() -> str:
    """What the figures depend on: host, the cores this process may use, torch, threads per
    stage, and whether ranks are bound to cores (figures measured unbound priced bound runs)."""
    cores = usable_cores()
    return json.dumps(
        {
            "host": socket.gethostname(),
            "cores": cores,
            "torch": str(torch.__version__),  # a plain str (torch.__version__ is a TorchVersion)
            "stage threads": STAGE_THREADS,
            "method": METHOD,
            "ranks bound": binding_wanted(),
        },
        sort_keys=True,
    )


def measure_machine_costs(links: int = 3) -> MachineCosts:
    """gloo's latency and bandwidth between two processes, the runtime's overhead per action and
    gloo's all-reduce fixed cost and bandwidth, measured now (10-20 s). The link and the
    all-reduce are measured ``links`` times each and the medians kept: they are timed on the wall clock, and
    one measurement's bandwidth varied 5.9-8.8 GB/s on an idle 2-core machine (α 29-58 us; 4 us
    to 1.2 ms from the median round trip before the fastest was taken,
    :mod:`pipeoptim.runtime.linkcost`). The overhead is CPU time, which other processes inflate
    less than wall time, but still: 0.94 ms per action with four busy loops running against
    0.60-0.70 idle.

    Raises:
        ValueError: the link timings were noise three times in a row (a machine too busy).
        RuntimeError, PipelineError: a measuring process failed or did not answer.
    """
    alphas, betas = zip(*(measure_link("gloo") for _ in range(links)))
    overhead = measure_action_overhead()
    ring_alphas, ring_bandwidths = zip(*(measure_allreduce("gloo") for _ in range(links)))
    return MachineCosts(
        statistics.median(alphas),
        1.0 / statistics.median(betas),
        overhead,
        statistics.median(ring_bandwidths),
        statistics.median(ring_alphas),
    )


#: the figures in seconds; the others are bandwidths (bytes/s)
SECONDS_FIGURES = ("latency", "action_overhead", "allreduce_latency")


def _unusable(saved: object) -> str | None:
    """What in a cache entry (with or without :data:`MEASURED_AT`) is not a figure of this
    machine, ``None`` where all are: anything but the figures, one the cost model refuses (a
    hand-edited latency of 1e308 stopped planning with a traceback), or one beyond what any
    measurement here gives (:data:`MAX_CACHED_SECONDS`, :data:`MIN_CACHED_BANDWIDTH`; a
    latency of 3000 s at 1 B/s priced every plan at 0 mini-batches/s). Named, not shown cut:
    a message of the entry's first 120 characters hid the figure at fault (helper-144)."""
    if not isinstance(saved, dict):
        return f"{json.dumps(saved)[:60]}, not a table of figures"
    figures = {k: v for k, v in saved.items() if k != MEASURED_AT}
    missing, unknown = set(MachineCosts._fields) - set(figures), set(figures) - set(MachineCosts._fields)
    if missing or unknown:
        return ", ".join(
            [*(f"no {name}" for name in sorted(missing)), *(f"{n} unknown" for n in sorted(unknown))]
        )
    for name, value in figures.items():
        usable = isinstance(value, float) and (
            is_seconds(value) and value <= MAX_CACHED_SECONDS
            if name in SECONDS_FIGURES
            else is_bandwidth(value) and value >= MIN_CACHED_BANDWIDTH
        )
        if not usable:
            return f"{name} {json.dumps(value)}"
    return None


def _cached(saved: object) -> MachineCosts | None:
    """The figures of a cache entry, ``None`` where it holds others (:func:`_unusable`): then
    they are measured again."""
    if _unusable(saved) is not None:
        return None
    assert isinstance(saved, dict)
    return MachineCosts(**{k: v for k, v in saved.items() if k != MEASURED_AT})


def _age(measured_at: str) -> str:
    """``measured_at`` (ISO 8601) and how long ago, e.g. ``2026-12-01 09:12 UTC, 2 days ago``."""
    try:
        when = datetime.datetime.fromisoformat(measured_at)
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()
        shown = f"{when.astimezone(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    except (ValueError, OverflowError):  # year 1 or 9999 with an offset overflowed
        return "at an unreadable time"
    if seconds < 0:
        return f"{shown}, in the future"
    ago = next(
        (
            f"{int(seconds // size)} {unit}{'s' if seconds >= 2 * size else ''} ago"
            for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute"))
            if seconds >= size
        ),
        "just now",
    )
    return f"{shown}, {ago}"


def _figures(costs: MachineCosts) -> str:
    return (
        f"latency {costs.latency * 1e6:.0f} us, bandwidth {costs.bandwidth / 1e9:.2f} GB/s, "
        f"runtime overhead {costs.action_overhead * 1e3:.3f} ms per action, "
        f"all-reduce {costs.allreduce_latency * 1e6:.0f} us each and bandwidth "
        f"{costs.allreduce_bandwidth / 1e9:.2f} GB/s"
    )


def load_or_measure_machine_costs(
    cache: str | Path | None = None, log: Callable[[str], None] = lambda _msg: None
) -> MachineCosts:
    """:func:`measure_machine_costs`, remembered in ``<cache>/machine-costs.json`` (``cache``
    defaults to :func:`cache_dir`) under :func:`machine_key` with the time of the
    measurement; figures taken from there are logged with that time and age (a user reading
    the plan's rates learns they are not this moment's); measured again for another host, core
    count, torch version or method, or where the file is unreadable (logged).
    Figures measured while other processes took over
    :data:`~pipeoptim.other_work.OTHER_WORK_LIMIT` of the cores are used by this process only
    and not saved (logged): beside a test suite on 2 cores a measurement fitted gloo's latency at
    0 us, which every later plan on the machine would have used. Figures that cannot be saved
    (an unwritable cache) are likewise reused by this process (logged).

    Raises:
        what :func:`measure_machine_costs` raises.
    """
    path = Path(cache if cache is not None else cache_dir()) / MACHINE_COSTS_FILE
    key = machine_key()
    table = read_json_table(path, "measuring this machine's link and runtime overhead again", log)
    saved = table.get(key)
    cached = _cached(saved)
    if cached is None and key in table:
        log(
            f"measuring this machine's costs again: {path} holds {_unusable(saved)}, not a figure "
            "measured on this machine"
        )
    if cached is not None:
        measured = saved.get(MEASURED_AT) if isinstance(saved, dict) else None
        when = f"measured {_age(measured)}" if isinstance(measured, str) else "measured earlier"
        log(f"this machine's costs from {path} ({when}; delete it to measure again): {_figures(cached)}")
        return cached
    if (str(path), key) in _UNSAVED:
        return _UNSAVED[str(path), key]
    log("measuring this machine's link and runtime overhead, and gloo's all-reduce (once; 10-20 s)")
    costs, load = with_other_work(measure_machine_costs)
    figures = _figures(costs)
    if load is not None:  # kept, such figures priced every later plan (a latency of 0 us once)
        log(
            f"the machine was busy while measuring ({load}): {figures} are used by this process "
            "only, not saved; the next run measures again"
        )
        _UNSAVED[str(path), key] = costs
        return costs
    entry = {
        **costs._asdict(),
        MEASURED_AT: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        update_json_table(path, key, entry)
    except OSError as exc:
        log(
            f"measured {figures}, but could not save them in {path} ({exc}): this process reuses them, "
            f"every new run measures again; set {CACHE_ENV} to a writable folder"
        )
        _UNSAVED[str(path), key] = costs
    else:
        log(f"saved {path}: {figures}")
    return costs


def with_other_work(measure: Callable[[], T]) -> tuple[T, str | None]:
    """``measure()``, and how busy other processes kept this process's cores meanwhile where
    they took over :data:`~pipeoptim.other_work.OTHER_WORK_LIMIT` of their time
    (:class:`~pipeoptim.other_work.OtherWork`, the measuring processes left out), else
    ``None``. A snapshot of 0.25 s before measuring missed a test suite running beside the
    measurement (load about 3 on 2 cores), and one busy process on 2 cores (50%) never passed
    its limit of a half. Where ``/proc`` is absent, the 1-minute load average before measuring,
    where it exceeds half the cores (it lags and counts every process)."""
    if not other_work.available():
        return measure(), _load_average()
    meter = other_work.OtherWork()
    result = measure()
    share = meter.share()
    busy = share > other_work.OTHER_WORK_LIMIT
    return result, (f"other processes used {share:.0%} of the CPU time" if busy else None)


def _load_average() -> str | None:
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None
    return f"load average {load:.1f} on {cores} cores" if load > cores / 2 else None
