"""The cost of a message between two stages on the transport in use: α + β·bytes.

The Hockney model (Hockney, Parallel Computing 20(3), 1994) gives the time of one message of
``n`` bytes as ``α + β·n``: α the latency (seconds), β the inverse bandwidth (seconds per
byte). :func:`measure_link` times gloo (or NCCL) sends between two spawned processes at
several sizes, takes the fastest of the repeats at each size (:func:`message_time`), and
fits α and β by least squares in relative error (:func:`fit_latency_bandwidth`).
:func:`measure_allreduce` times an all-reduce between the two processes, which prices the
replicas' gradient sum: on loopback gloo an all-reduce of 8 MiB takes 4-6x the time of a send
(the ring's reductions and copies run on the CPU, and a rank woken late holds up the other),
and priced as sends the layouts of 2 x 2 and 1 x 4 ranks ran at 0.59 and 0.49 of their
predicted rate (helper-140).
:func:`shared_cores` says how many processors the stages of a CPU pipeline share,
:func:`ranks_beside` how many ranks run beside each at once. All feed
:class:`pipeoptim.compiler.costmodel.CostConfig`.

Why not the median and a plain least-squares fit: on the project's 2-core virtual machine a
round trip takes either its time (4 KiB: ~40 us) or ~1.8 ms more, when a process blocked in
its receive is woken late; the slow ones come in runs, up to all of one size's repeats. The
median of 9 landed in either mode (4 KiB: 52 or 1,899 us; 1 MiB: 217 or 2,071 us), and a
plain fit, led by the big messages' absolute times, turned that into α of 4 to 1,246 us in
six measurements seconds apart (2026-12-05); the throughput benchmark priced its plans with
α = 1,133 us, 45x the 25 us it had measured the day before. The lower quartile of 16 still
gave α = 977 us once in 14 measurements. The stall only adds time and is the host's, not the
link's: the fastest repeat drops it unless all of a size's repeats stall (α 31-48 us in 8
measurements), and the relative fit lets the small messages set α and the big ones β.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pipeoptim.runtime.affinity import host_cores, pin_rank
from pipeoptim.runtime.distributed import STAGE_THREADS
from pipeoptim.runtime.spawning import free_port, run_processes

#: message sizes timed by default (bytes): small ones for α, large ones for β
SIZES = (4 << 10, 64 << 10, 1 << 20, 8 << 20)
#: round trips timed per size by default: the fastest is kept (:func:`message_time`)
REPEATS = 16
#: two sizes far apart for a quick measurement (closer ones can time in the wrong order under load)
QUICK_SIZES = (4 << 10, 8 << 20)
#: all-reduce sizes timed by default (bytes): a small model's gradients, and a stage's in the
#: benchmarks (8.4 MB at 2 stages of the 16 x 512 MLP), within one of the runtime's 25 MiB buckets
ALLREDUCE_SIZES = (64 << 10, 8 << 20)
#: all-reduces timed by default: their mean is kept (:func:`measure_allreduce`)
ALLREDUCE_REPEATS = 32


def fit_latency_bandwidth(sizes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """α ≥ 0 (seconds), β (seconds per byte) of ``seconds ≈ α + β·sizes``, by least squares
    in relative error: ``Σ ((α + β·n − t) / t)²`` is minimised, so that each size counts alike
    over sizes three decades apart (a plain fit is led by the biggest messages' absolute
    times, and their noise set α). Where the free fit's α is negative, β is refitted through
    the origin the same way.

    Args:
        sizes: message sizes (bytes), at least two different ones.
        seconds: the time of one message of each size (seconds, > 0).

    Raises:
        ValueError: fewer than two distinct sizes, a time that is not positive, or times that
            do not grow with the size (β ≤ 0: the timings are noise, e.g. a loaded machine;
            measure again).
    """
    if len(sizes) != len(seconds):
        raise ValueError(f"{len(sizes)} message sizes but {len(seconds)} times: give one time per size")
    if not all(math.isfinite(n) and n > 0 for n in sizes):
        raise ValueError(f"message sizes must be positive numbers of bytes, got {list(sizes)}")
    if len(set(sizes)) < 2:
        raise ValueError("need the time of at least two different message sizes")
    if not all(math.isfinite(t) and t > 0 for t in seconds):
        raise ValueError(f"message times must be positive, finite seconds, got {list(seconds)}")
    # weighted least squares, weight 1/t² per size: the normal equations of (α, β)
    w = [1 / (t * t) for t in seconds]
    sw, swn, swnn = sum(w), sum(wi * n for wi, n in zip(w, sizes)), sum(wi * n * n for wi, n in zip(w, sizes))
    swt, swnt = (
        sum(wi * t for wi, t in zip(w, seconds)),
        sum(wi * n * t for wi, n, t in zip(w, sizes, seconds)),
    )
    det = sw * swnn - swn * swn
    alpha, beta = (swnn * swt - swn * swnt) / det, (sw * swnt - swn * swt) / det
    if alpha < 0:
        alpha, beta = 0.0, swnt / swnn
    if beta <= 0:
        raise ValueError(
            f"send times {[f'{t:.3g}' for t in seconds]} s do not grow with the message sizes {list(sizes)} "
            "bytes: the machine is too busy to measure the link; measure again or give the bandwidth"
        )
    return alpha, beta


def _ping(
    rank: int, port: int, backend: str, sizes: Sequence[int], repeats: int, collective: bool, out: Any
) -> None:
    """Time ``repeats`` (and one to warm up) round trips between ranks 0 and 1, halved, or
    all-reduces (``collective``) of each size; rank 0 puts the times per size on ``out``."""
    torch.set_num_threads(1)
    if backend == "gloo":  # as the stages' ranks run (pipeoptim.runtime.affinity)
        pin_rank(rank, 2)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    per_size = []
    for size in sizes:
        x = torch.zeros(size // 4, device=device)
        times = []
        for _ in range(repeats + 1):  # a round trip (rank 0 sends, rank 1 sends back) or an all-reduce
            dist.barrier()
            start = time.perf_counter()
            if collective:
                dist.all_reduce(x)
            elif rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(x, 0)
                dist.send(x, 0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) / (1 if collective else 2))
        per_size.append(times[1:])  # the first warms the size's buffers up
    if rank == 0:
        out.put((0, per_size))
    dist.barrier()
    dist.destroy_process_group()


def message_time(seconds: Sequence[float]) -> float:
    """The time of one message of a size from its repeats (seconds): the fastest, as a late
    wake-up of a blocked receiver only adds time (module docstring).

    Raises:
        ValueError: no repeats, or one that is not a positive, finite number.
    """
    times = [float(t) for t in seconds]
    if not times:
        raise ValueError("no message times")
    if not all(math.isfinite(t) and t > 0 for t in times):
        raise ValueError(f"message times must be positive, finite seconds, got {times}")
    return min(times)


def measure_link(
    backend: str = "gloo", sizes: Sequence[int] = SIZES, repeats: int = REPEATS, timeout: float = 300.0
) -> tuple[float, float]:
    """α (seconds per message) and β (seconds per byte) of a send between two processes on
    this machine over ``backend`` (``"gloo"``; ``"nccl"`` between the first two GPUs).

    Each size is timed as ``repeats`` round trips (half a round trip is one message), the
    fastest taken (:func:`message_time`), and α, β fitted over the sizes
    (:func:`fit_latency_bandwidth`); measured again, up to three times, while the times do
    not grow with the size.

    Raises:
        RuntimeError: the processes did not report within ``timeout`` seconds.
        ValueError: fewer than two sizes, a size that is not a positive multiple of 4 bytes, or
            ``repeats`` < 1 (before any process starts); three measurements in a row were
            noise (β ≤ 0).
    """
    return _fitted(backend, sizes, repeats, timeout, collective=False)


def measure_allreduce(
    backend: str = "gloo",
    sizes: Sequence[int] = ALLREDUCE_SIZES,
    repeats: int = ALLREDUCE_REPEATS,
    timeout: float = 300.0,
) -> tuple[float, float]:
    """The fixed cost (seconds per all-reduce) and bandwidth (bytes/s) of a ring all-reduce on
    this machine over ``backend``, as :class:`pipeoptim.compiler.costmodel.CostConfig` takes
    them (``allreduce_latency_s``, ``allreduce_bandwidth``): an all-reduce of ``P`` bytes among
    ``R`` ranks costs the fixed cost and moves ``2(R−1)/R · P`` bytes at the bandwidth
    (Patarasuk and Yuan, JPDC 2009). Measured between two processes (bound to a core each, as
    the stages' ranks are), where that is ``f + P / b``: ``f`` and ``1 / b`` are the fixed and
    per-byte parts of a relative least-squares fit (:func:`fit_latency_bandwidth`) of the mean
    time of ``repeats`` all-reduces of each size; measured again, up to three times, while the
    means do not grow with the size. The fixed cost is mostly late wake-ups, paid once per
    all-reduce: at R=4 it is 1.2-2x that at R=2, not the 3x of a ring's ``2(R−1)`` messages
    (helper-145).

    The mean, not the fastest as for the link's α and β: a stage waits for its all-reduce
    before it steps, so it pays every late wake-up of a blocked rank, ~1.5-3 ms on the
    project's 2-core VM in about half of the all-reduces, whatever their size (64 KiB: fastest
    0.11-0.14 ms, mean 1.6-2.2 ms; 8 MiB: 2.8-4.1 and 5.7-7.4 ms; 2026-12-06, helper-144).
    Priced at the fastest, the layouts of 2 x 2 and 1 x 4 ranks ran at 0.62 and 0.58 of their
    prediction (at the link's bandwidth, 0.59 and 0.49); priced as bytes alone at the 8 MiB
    mean, the digits CNN's 1 x 2 (a 230 KB all-reduce) at 0.55-0.58.

    Raises:
        the errors of :func:`measure_link`.
    """
    fixed, beta = _fitted(backend, sizes, repeats, timeout, collective=True)
    return fixed, 1.0 / beta


def _fitted(
    backend: str, sizes: Sequence[int], repeats: int, timeout: float, collective: bool
) -> tuple[float, float]:
    """α, β of the sends (the fastest of each size's round trips) or all-reduces (the mean of
    each size's, ``collective``), measured again while they are noise."""
    if len({int(n) for n in sizes}) < 2 or min(sizes) < 4 or any(n % 4 for n in sizes) or repeats < 1:
        raise ValueError(
            f"measuring the {'all-reduce' if collective else 'link'} needs two or more different sizes, "
            f"each a positive multiple of 4 bytes (float32 elements), and repeats >= 1; got sizes "
            f"{list(sizes)}, repeats {repeats}"
        )
    typical = statistics.fmean if collective else message_time
    noise: ValueError | None = None
    for _ in range(3):  # a busy machine can time a big message faster than a small one
        try:
            times = [typical(ts) for ts in _round_trips(backend, sizes, repeats, timeout, collective)]
            return fit_latency_bandwidth(list(sizes), times)
        except ValueError as exc:
            noise = exc
    assert noise is not None
    if collective:  # the fit's message names sends and the link
        raise ValueError(
            f"gloo's all-reduce took as long at {max(sizes)} bytes as at {min(sizes)} three times: the "
            "machine is too busy to measure it; measure again when it is idle"
        ) from noise
    raise noise


def _round_trips(
    backend: str, sizes: Sequence[int], repeats: int, timeout: float, collective: bool
) -> list[list[float]]:
    """Per size, the time of each of ``repeats`` round trips, halved, or all-reduces (seconds)."""
    port = free_port()
    args = [(r, port, backend, list(sizes), repeats, collective) for r in range(2)]
    what = f"measuring the {backend} {'all-reduce' if collective else 'link'}"
    return run_processes(_ping, args, what, replies=1, timeout=timeout)[0]


def usable_cores() -> int:
    """The processors this process may run on, as before a torchrun rank bound itself to its
    own (:func:`pipeoptim.runtime.affinity.host_cores`): bound, a rank priced 2 ranks on 2
    cores as sharing 1, and its plan differed from the same job's in one process."""
    cores = host_cores()
    return len(cores) if cores is not None else os.cpu_count() or 1


@contextlib.contextmanager
def stage_threads(executor: str, device: torch.device) -> Iterator[None]:
    """Within: torch runs :data:`STAGE_THREADS` threads where the stages run as worker processes
    on the CPU (``executor`` "processes"), or as the local executor runs them to compute what the
    workers compute (``executor`` "local", :func:`pipeoptim.runtime.launch.start_executor`), so
    that profiles, optimizer-update costs and the local stages' numbers are those of a worker.
    Timed with this process's threads (torch's default: one per core) a stage looked up to
    cores x faster than it runs (2x here, each forward and backward of the benchmark MLP), and
    the plan's throughput was over-predicted by as much. torchrun ranks keep their own threads."""
    if executor not in ("processes", "local") or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(STAGE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shared_cores(num_stages: int, threads_per_stage: int = STAGE_THREADS) -> float | None:
    """Processors a CPU pipeline's stages share: the cores this process may run on, in units
    of a stage's threads; ``None`` when there are at least as many as the stages need (each
    stage then runs as on its own device)."""
    units = usable_cores() / threads_per_stage
    return units if units < num_stages else None


def ranks_beside(ranks: int, device: torch.device | str) -> int:
    """How many other ranks of a pipeline of ``ranks`` run beside each one at once on this
    machine's CPU, sharing its memory bandwidth and caches: ``min(ranks, cores) - 1`` on the
    CPU where torch runs one thread in this process (as the stage workers do,
    :func:`stage_threads`), else 0: an accelerator has its own memory, and ranks of several
    threads each (torchrun on a bigger machine) are timed alone (their sharing is not
    modelled). Feeds :func:`pipeoptim.update_cost.measure_update_cost`'s ``beside``."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() != 1:
        return 0
    return max(min(ranks, usable_cores()) - 1, 0)
