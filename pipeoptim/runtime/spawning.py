"""How the stage worker processes are started (:class:`pipeoptim.runtime.distributed.ProcessExecutor`):
from a fork server that has imported torch once, the pipeline spec as bytes any worker can
load, the caller's main module not re-run, and no Ctrl-C or SIGTERM delivered half-way through a start."""

from __future__ import annotations

import contextlib
import multiprocessing.context
import multiprocessing.util as mp_util
import os
import pickle
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from pipeoptim.errors import PipelineError, first_line
from pipeoptim.runtime.build import PipelineSpec
from pipeoptim.runtime.driver_watch import follow_driver
from pipeoptim.runtime.parametrized_pickle import dumps
from pipeoptim.runtime.predictors import register_again, registered_for

#: what the fork server imports once for every worker it starts: torch, and torch._dynamo, which
#: every optimizer's constructor imports (1.7 s of a spawned worker's start here)
FORKSERVER_PRELOAD = ("torch", "torch._dynamo", "torch.optim", "pipeoptim.runtime.worker")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_context() -> multiprocessing.context.BaseContext:
    """The ``multiprocessing`` context that starts worker processes.

    ``forkserver`` (preloading :data:`FORKSERVER_PRELOAD`) where the platform has it and no
    CUDA device is visible: the server imports torch once per driving process, and each worker
    is a fork of it. A 4-stage pipeline of a small model went from ``compile`` to its first loss
    in 0.2 s instead of 5.9-7.1 s with ``spawn`` (every worker importing torch and torch._dynamo
    on this 2-core machine); the first pipeline of a process also starts the server (4 s).
    ``spawn`` where CUDA is visible (a CUDA runtime must not be inherited across ``fork``) or
    ``forkserver`` is missing (Windows). Either way a worker loads the pipeline from bytes
    (:func:`pickle_spec`) and gets the driver's environment as it is at the start
    (:func:`pipeoptim.runtime.worker.worker_main`), not the server's. The server's socket goes
    to a short folder where ``$TMPDIR`` is too long for one (:func:`socket_folder_fits`).

    Raises:
        PipelineError: no folder short enough for the server's socket (:func:`socket_folder_fits`).
    """
    if "forkserver" in mp.get_all_start_methods() and not torch.cuda.is_available():
        socket_folder_fits()
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
        return context
    return mp.get_context("spawn")


#: the longest path of an AF_UNIX socket (``sockaddr_un.sun_path`` less its final NUL byte)
SOCKET_PATH_MAX = (104 if sys.platform == "darwin" else 108) - 1
#: what ``multiprocessing`` adds to the temporary folder for the fork server's socket: its own
#: folder ``/pymp-XXXXXXXX`` and the socket ``/listener-XXXXXXXX``
_LISTENER = len("/listener-XXXXXXXX")
_SOCKET_SUFFIX = len("/pymp-XXXXXXXX") + _LISTENER
#: where the socket goes when ``$TMPDIR`` is too long (as Python 3.14's ``multiprocessing``
#: does, python/cpython#132124)
SHORT_TEMP_FOLDERS = ("/tmp", "/var/tmp", "/usr/tmp")


def socket_folder_fits(short_folders: tuple[str, ...] = SHORT_TEMP_FOLDERS) -> None:
    """Make sure the fork server's socket path fits AF_UNIX's limit (:data:`SOCKET_PATH_MAX`).

    ``multiprocessing`` binds the socket under the temporary folder (``$TMPDIR``); with a
    ``$TMPDIR`` of more than about 75 characters (a job scheduler's or a build tool's folder)
    the first worker's start failed with ``OSError: AF_UNIX path too long``. Where the folder
    is too long, ``multiprocessing``'s own folder for this process is made in the first of
    ``short_folders`` that can be written to, for this process only; ``$TMPDIR`` stays as set
    for everything else.

    Raises:
        PipelineError: the socket path is too long and no short folder can be written to, or
            ``multiprocessing``'s folder was already made too long for the socket.
    """
    if len(tempfile.gettempdir()) + _SOCKET_SUFFIX <= SOCKET_PATH_MAX:
        return
    short = next((f for f in short_folders if os.access(f, os.W_OK | os.X_OK)), None)
    if short is None:
        raise PipelineError(_too_long(f"none of {', '.join(short_folders)} can be written to"))
    before, tempfile.tempdir = tempfile.tempdir, short
    try:
        made = mp_util.get_temp_dir()  # made now under the short folder (unless made before), kept
    finally:
        tempfile.tempdir = before
    if len(made) + _LISTENER > SOCKET_PATH_MAX:
        raise PipelineError(_too_long(f"multiprocessing already made its folder {made} there"))


def _too_long(why: str) -> str:
    return (
        f"the temporary folder {tempfile.gettempdir()} is too long for the socket of the fork server "
        f"that starts the workers (AF_UNIX paths have at most {SOCKET_PATH_MAX} characters) and {why}: "
        f"set TMPDIR to a folder of at most {SOCKET_PATH_MAX - _SOCKET_SUFFIX} characters"
    )


#: what a script that starts a pipeline at import time is told
MAIN_GUARD = (
    "Workers import your script: a script must call pipeoptim.compile() under `if __name__ == '__main__':`"
)


def check_not_importing_main() -> None:
    """Refuse to start workers from a worker that is importing the user's script (a script
    without a main guard), before anything is created that only a clean exit releases
    (``multiprocessing``'s semaphores: the resource tracker warned of them as leaked).

    Raises:
        PipelineError: called while this process is a starting worker (:data:`MAIN_GUARD`).
    """
    if getattr(mp.current_process(), "_inheriting", False):  # multiprocessing's own test
        raise PipelineError(f"this worker process is importing the main script. {MAIN_GUARD}")


def pickle_spec(spec: PipelineSpec) -> bytes:
    """``spec`` as bytes a spawned worker can load, whatever ran the caller.

    ``cloudpickle`` sends classes and functions defined in ``__main__`` by value: a model
    class or loss function written in a notebook, ``python -c`` or ``python -`` (stdin),
    where the worker has no main module to import them from, and lambdas; modules with
    parametrized weights, which torch refuses to pickle, go as what they are made of
    (:mod:`pipeoptim.runtime.parametrized_pickle`). The weight predictors registered for the
    optimizer's class go with it (:func:`pipeoptim.runtime.predictors.registered_for`).

    Raises:
        PipelineError: something in the model, loss function or inputs cannot be pickled;
            the message names it and the fixes.
    """
    try:  # the predictors registered for the optimizer class travel with it (one pickle: same class)
        return dumps((spec, registered_for(spec.optimizer_class)))
    except Exception as exc:
        fix = "remove the unpicklable attribute (open files, locks, generators), or use executor='local'"
        raise PipelineError(
            f"the model, loss_fn or example inputs cannot be sent to the stage worker processes "
            f"({type(exc).__name__}: {first_line(exc)}): {fix}"
        ) from exc


def unpickle_spec(payload: bytes) -> PipelineSpec:
    """The spec :func:`pickle_spec` made, in a worker: the optimizer's weight predictors
    registered again for the class as it arrived."""
    spec, predictors = pickle.loads(payload)
    register_again(predictors)
    return spec


@contextlib.contextmanager
def main_module_not_rerun() -> Iterator[None]:
    """Start spawned workers without re-running a main "file" that does not exist.

    ``multiprocessing`` makes a spawned child run the parent's ``__main__.__file__``; under
    ``python -`` that is ``'<stdin>'`` and the child dies before it starts. The workers need
    nothing from it (:func:`pickle_spec`), so it is hidden while they start.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    hide = (
        main is not None
        and path is not None
        and getattr(getattr(main, "__spec__", None), "name", None) is None
        and not os.path.isfile(path)
    )
    if hide:
        del main.__file__
    try:
        yield
    finally:
        if hide:
            main.__file__ = path


def _as_child(target: Callable[..., None], *args: Any) -> None:
    """``target(*args)`` as a stage worker runs: Ctrl-C ignored (a terminal's reaches the whole
    process group, and the process that started this one stops it: :func:`run_processes`),
    SIGTERM obeyed from that process alone, and an end within a second of its own (a driver
    killed without clean-up: the ranks of a benchmark whose driver got a SIGTERM lived on for
    an hour, blocked in gloo and then in writing to a queue nobody read;
    :mod:`pipeoptim.runtime.driver_watch`)."""
    follow_driver(getattr(target, "__qualname__", "a child process"))
    leave_agent_store()
    target(*args)


def leave_agent_store() -> None:
    """Drop ``TORCHELASTIC_USE_AGENT_STORE`` from this process's environment: started from a
    torchrun rank, a process inherits it, and its own ``init_process_group(init_method=
    "tcp://...")`` then waits as a client for a store its group's rank 0 never serves (this
    machine's link measured from a torchrun job waited out its 120 s timeout, helper-144)."""
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)


def run_processes(
    target: Callable[..., None],
    args: Sequence[tuple],
    what: str,
    replies: int | None = None,
    timeout: float = 900.0,
    context: multiprocessing.context.BaseContext | None = None,
) -> dict[Any, Any]:
    """One process per tuple ``a`` of ``args``, started as workers are (:func:`worker_context`,
    or ``context``), running ``target(*a, out)`` as :func:`_as_child` runs it (ending with this
    process, if it is killed); the ``(key, value)`` pairs
    they put on the queue ``out`` (``replies`` of them; default one per process), by key.

    A process that exits with an error ends the wait at once, not after ``timeout``: the others
    may wait on it (in a process group) for good. Every process is stopped on the way out,
    whatever ends the wait (the replies in, a failure, Ctrl-C).

    Raises:
        RuntimeError: a process exited with an error before the replies were in (``"{what}:
            process i exited with code c"``), every process exited without them all, or they
            took over ``timeout`` seconds.
    """
    check_not_importing_main()
    context = context or worker_context()
    out = context.Queue()
    procs = [context.Process(target=_as_child, args=(target, *a, out)) for a in args]
    replies = len(procs) if replies is None else replies
    parts: dict[Any, Any] = {}
    finished = False
    try:
        with main_module_not_rerun(), signals_deferred():
            for p in procs:
                p.start()
        deadline, settled = time.monotonic() + timeout, False
        while len(parts) < replies:
            try:
                key, value = out.get(timeout=0.5)
                parts[key] = value
                continue
            except queue.Empty:
                pass
            dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"{what}: process {dead[0][0]} exited with code {dead[0][1]} (see its output above)"
                )
            if settled:
                raise RuntimeError(f"{what}: every process exited with {len(parts)} of {replies} replies in")
            settled = all(p.exitcode is not None for p in procs)  # one more look: a last reply in transit
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} took over {timeout:.0f} s")
        finished = True
    finally:  # killed at once unless the replies all came (a failure, Ctrl-C)
        started = [p for p in procs if p.pid is not None]
        if not finished:  # all before any join: one left waiting on a killed peer printed its
            for p in started:  # error (a Ctrl-C during the link measurement, helper-166)
                p.kill()
        for p in started:
            p.join(30)
            if p.is_alive():
                p.kill()
    return parts


#: the signals that stop a run (Ctrl-C; SIGTERM from ``kill``, a job scheduler or a container
#: stop, which ``pipeoptim train`` turns into an interruption like Ctrl-C)
STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Let no Ctrl-C or SIGTERM cut the block short: one arriving during it is recorded and
    delivered again once the block has ended, to the handler there was before (Ctrl-C:
    ``KeyboardInterrupt``; ``pipeoptim train``'s SIGTERM: ``KeyboardInterrupt`` too; an
    ignored signal stays ignored). Only in the main thread; elsewhere Python delivers no
    signal anyway.

    Used where half-done work is worse than a late stop: starting children (a child whose
    start was cut short is never stopped: under SIGTERM one went on starting after the driver
    had gone and printed a ``FileNotFoundError`` traceback from the fork server) and writing a
    run's last record (a second Ctrl-C during the write of ``metrics.json`` left none, or the
    one of an earlier epoch). A Ctrl-C in a terminal reaches every process of the foreground
    group; a worker still importing torch would die with a ``KeyboardInterrupt`` traceback. A
    child inherits the signal mask across ``fork`` and ``exec``, so workers started while the
    signals are blocked never receive them (they also ignore Ctrl-C once running). A signal
    during the block is recorded even where it reaches another thread, which blocking in this
    one does not prevent.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    handlers = {
        sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in STOPPING_SIGNALS
    }
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOPPING_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending signal reaches the recorder
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for signum in dict.fromkeys(received):  # each once, in the order they came
        signal.raise_signal(signum)


def check_devices(num_stages: int) -> None:
    """Raise :class:`PipelineError` if CUDA is present with fewer devices than stages."""
    if torch.cuda.is_available() and torch.cuda.device_count() < num_stages:
        raise PipelineError(
            f"{num_stages} stages need {num_stages} GPUs but this machine has "
            f"{torch.cuda.device_count()}: use gpus={torch.cuda.device_count()} or fewer"
        )
