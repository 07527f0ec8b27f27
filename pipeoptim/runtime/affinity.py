"""Each CPU rank on cores of its own: the rank's thread and the transport's threads together.

gloo runs threads of its own in each process beside the stage's thread. Left to the scheduler
on this project's 2-core machine, posting and retiring sends took 2.1-2.8 ms per mini-batch of
stage 1 (MLP 16x512, 2 stages, one torch thread per rank) against 0.3-0.5 ms with each rank
and its threads bound to a core; ``benchmarks/affinity.py`` measured the pipeline 1.27x as
fast bound as a torchrun job at 2 stages, 1.05x at 4 (two ranks per core), 0.995x and 1.05x
with the processes executor (2026-12-07). :func:`pin_rank` binds a rank before its process
group starts, so that gloo's threads (and torch's, started later) inherit its cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

#: environment variable that turns the binding off (``off``, ``0``, ``false`` or ``no``) or on
#: (unset, empty, ``on``, ``1``, ``true`` or ``yes``: the default)
AFFINITY_ENV = "PIPEOPTIM_CPU_AFFINITY"
_OFF = ("off", "0", "false", "no")
_ON = ("", "on", "1", "true", "yes")
#: the cores the calling thread had before :func:`pin_rank` bound it
_before: set[int] | None = None


def binding_asked() -> bool:
    """What :data:`AFFINITY_ENV` says (on where unset).

    Raises:
        ValueError: another value (a typo would otherwise mean "on").
    """
    value = os.environ.get(AFFINITY_ENV, "").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(
            f"{AFFINITY_ENV}={os.environ[AFFINITY_ENV]!r} is neither on nor off: set it to 'off' to leave "
            "the ranks to the scheduler, or unset it"
        )
    return value in _ON


def rank_cores(local_rank: int, local_world: int, cores: Iterable[int]) -> list[int]:
    """The cores of rank ``local_rank`` of the ``local_world`` ranks on this host, among
    ``cores`` (those this process may use): an equal block of them in rank order where every
    rank gets one (``len(cores) // local_world`` each; the rest unused), else the single core
    ``local_rank mod len(cores)`` (ranks share cores in turn).

    Raises:
        ValueError: ``local_rank`` not in ``[0, local_world)`` or no cores.
    """
    usable = sorted(cores)
    if not 0 <= local_rank < local_world or not usable:
        raise ValueError(f"rank {local_rank} of {local_world} ranks on cores {usable}: nothing to bind to")
    per = len(usable) // local_world
    if per:
        return usable[local_rank * per : (local_rank + 1) * per]
    return [usable[local_rank % len(usable)]]


def binding_wanted() -> bool:
    """Whether :func:`pin_rank` binds: :data:`AFFINITY_ENV` not off (two jobs on one host would
    otherwise take the same cores), the platform can (``os.sched_setaffinity``: not macOS or
    Windows), and this process may use every core of the machine: a process held to some
    already (a launcher binding each rank, ``taskset``, ``numactl``, a container's cpuset) is
    left as it is, where binding again would give a rank a share of its own share.

    Raises:
        ValueError: :data:`AFFINITY_ENV` is neither on nor off (:func:`binding_asked`).
    """
    if not binding_asked() or not hasattr(os, "sched_setaffinity"):
        return False
    return len(os.sched_getaffinity(0)) >= (os.cpu_count() or 0)


def ranks_bound() -> bool:
    """Whether a pipeline's CPU ranks run bound to cores (:func:`pin_rank`): this process's
    thread is bound already (a torchrun rank plans after binding itself, when
    :func:`binding_wanted` reads its own single core as someone else's binding: helper-142),
    or :func:`binding_wanted` says the ranks will be.

    Raises:
        ValueError: :data:`AFFINITY_ENV` is neither on nor off (:func:`binding_asked`).
    """
    return _before is not None or binding_wanted()


def pin_rank(local_rank: int, local_world: int) -> list[int] | None:
    """Bind the calling thread, and the threads it starts from now on, to :func:`rank_cores`
    of the machine's cores where :func:`binding_wanted`; call before ``init_process_group``.
    Returns the cores, or ``None`` where nothing was bound."""
    global _before
    if not binding_wanted():
        return None
    _before = os.sched_getaffinity(0)
    cores = rank_cores(local_rank, local_world, _before)
    os.sched_setaffinity(0, cores)
    return cores


def unpin_rank() -> None:
    """Give the calling thread back the cores it had before :func:`pin_rank` (once the process
    group is gone: under torchrun the user's script goes on after ``close()``, and stayed on
    one core)."""
    global _before
    if _before is not None:
        os.sched_setaffinity(0, _before)
        _before = None


def host_cores() -> set[int] | None:
    """The cores this process may use as it was before :func:`pin_rank` bound its thread to
    some of them (a torchrun rank plans for the cores all ranks share, not its own one);
    ``None`` where the platform does not say."""
    if _before is not None:
        return set(_before)
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def cores_to_spare(local_world: int) -> bool:
    """Whether each of the ``local_world`` ranks on this host can have a core of its own (no
    more ranks than :func:`host_cores`, or than ``os.cpu_count()`` where the platform does not
    say which): a rank's work in what would be its idle time then takes no core from another."""
    cores = host_cores()
    return local_world <= (len(cores) if cores is not None else os.cpu_count() or 1)


def unbind_thread() -> None:
    """Let the calling thread run on :func:`host_cores` (a helper thread of a rank bound by
    :func:`pin_rank`, which would otherwise share that rank's core)."""
    cores = host_cores()
    if cores is not None and _before is not None:
        os.sched_setaffinity(0, cores)  # on Linux, 0 is the calling thread


def driver_cores() -> list[int] | None:
    """The cores this process may use, to hand to the worker processes it starts
    (:func:`take_cores`); ``None`` where the platform does not say."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def take_cores(cores: list[int] | None) -> None:
    """Use ``cores`` (:func:`driver_cores` of the driver), as a worker forked from the fork
    server would otherwise keep the server's, taken when the driver's first pipeline started."""
    if cores is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
