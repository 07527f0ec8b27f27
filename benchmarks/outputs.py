"""Where a benchmark writes its results (only a full run replaces the committed ones), and
the options its command lines share."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeoptim.compiler.profile_key import cpu_model
from pipeoptim.fileio import atomic_write
from pipeoptim.runtime.affinity import binding_asked
from pipeoptim.tasks import make_task

RESULTS = Path(__file__).resolve().parent / "results"
#: the options that narrow a run (:func:`is_full_run`): their names, or each mapped to the value
#: the full run takes where its default is ``None``
Scope = Iterable[str] | Mapping[str, Any]


def host(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The machine a result was measured on, for its title: the CPU model
    (:func:`pipeoptim.compiler.profile_key.cpu_model`, as profiles name it), the cores and
    torch's version. Results of two hosts differ in their ratios too (a 2-core AMD EPYC ran
    the test suite 1.25-1.6x slower than the host of the committed throughput run), so every
    title names its host."""
    return f"{cpu_model(cpuinfo)}, {os.cpu_count()} cores, torch {torch.__version__}"


def parse_rank_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser.parse_args()`` for a benchmark that starts stage processes: a
    ``PIPEOPTIM_CPU_AFFINITY`` that is neither on nor off is a usage error (exit 2) before
    anything runs; each rank printed its traceback and the run ended in a ``RuntimeError``."""
    args = parser.parse_args()
    try:
        binding_asked()
    except ValueError as exc:
        parser.error(str(exc))
    return args


#: the help of every benchmark's ``--out`` (where :func:`results_dir` writes)
OUT_HELP = (
    "where to write (default: benchmarks/results for the full run; a new temporary folder, named "
    "on stderr, for --quick or a narrowed run)"
)


def results_dir(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    prefix: str,
    scope: Scope = (),
    needs: Callable[[], list[str]] | None = None,
) -> Path:
    """``args.out`` when given; :data:`RESULTS` (``benchmarks/results``, wherever the script is
    started from) for the full run: no ``--quick``, every option named in ``scope`` (those
    that measure a part or a variant: stage counts, methods, seeds, steps) at its default, and
    nothing ``needs()`` names missing (the data it would skip or replace, e.g. ``../shared``
    absent: a full run without it replaced the committed staleness study with "0 cells",
    helper-137; it is a partial run then, ``args.left_out`` names what it lacks); otherwise a
    new temporary folder. A run of two methods at 2 stages once replaced the committed
    4-stage breakdown of all five.

    The folder is made at once; one that cannot be made or written is a usage error (exit 2):
    prediction_error.py did all its work, then failed to write.

    Raises:
        AttributeError: ``scope`` names an option the parser does not have.
    """
    args.left_out = needs() if needs is not None and is_full_run(parser, args, scope) else []
    lacks = f"this run lacks {'; '.join(args.left_out)}: it is a partial run" if args.left_out else ""
    if (
        args.out is not None
        and Path(args.out).resolve() == RESULTS.resolve()
        and not is_full_run(parser, args, scope)
    ):
        # a quick, narrowed or data-lacking run said to keep them, then wrote over them (helper-139, 142)
        kind = lacks or f"this is a {run_kind(parser, args, scope)} run"
        parser.error(f"{kind}, which does not write the committed results in {RESULTS}: pass another --out")
    if lacks:
        print(f"{lacks}; the committed results in {RESULTS} stay as they are", file=sys.stderr)
    if args.out is not None:
        folder = Path(args.out)
    elif is_full_run(parser, args, scope):
        folder = RESULTS
    else:
        folder = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    try:  # made now: a folder that cannot be written fails the run before its work, not after
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot make the results folder {folder} ({exc.strerror}): pass another --out")
    if not os.access(folder, os.W_OK):
        parser.error(f"cannot write into the results folder {folder}: pass another --out")
    print(f"results go to {folder}", file=sys.stderr)  # a temporary folder is named nowhere else
    return folder


def is_full_run(parser: argparse.ArgumentParser, args: argparse.Namespace, scope: Scope) -> bool:
    """No ``--quick``, every option of ``scope`` at its default or, where ``scope`` maps it to
    one, at the value the full run takes for it (an option defaulting to ``None`` because
    ``--quick`` changes it: ``--seeds 3`` is the full run's 3 seeds, which was refused as a
    partial run, helper-152; lists in any order), and no data left out
    (:func:`results_dir`): the run whose results are committed (its title says "full run"; any
    other says "quick run" or "partial run")."""
    full = scope if isinstance(scope, Mapping) else {}
    return (
        not getattr(args, "quick", False)
        and not getattr(args, "left_out", [])
        and all(
            _same(getattr(args, name), parser.get_default(name))
            or (name in full and _same(getattr(args, name), full[name]))
            for name in scope
        )
    )


def _same(value: Any, other: Any) -> bool:
    """Equal, lists and tuples in any order (``--methods b a`` runs what ``--methods a b``
    does) but with their repeats (``--stages 2 4 4`` measures 4 stages twice: compared as sets
    it passed for the full run, helper-154)."""
    if isinstance(value, (list, tuple)) and isinstance(other, (list, tuple)):
        return sorted(value, key=repr) == sorted(other, key=repr)
    return value == other


def run_kind(parser: argparse.ArgumentParser, args: argparse.Namespace, scope: Scope) -> str:
    """``"full"``, ``"quick"`` or ``"partial"`` (some of the full run's options narrowed)."""
    if getattr(args, "quick", False):
        return "quick"
    return "full" if is_full_run(parser, args, scope) else "partial"


def missing_tasks(names: Iterable[str]) -> list[str]:
    """The training tasks of ``names`` whose data is not on this machine, each with where it
    was looked for (for :func:`results_dir`'s ``needs``)."""
    missing = []
    for name in names:
        try:
            make_task(name, batch_size=8, limit=8, test_limit=8)
        except FileNotFoundError as exc:
            missing.append(f"the {name} data ({str(exc).splitlines()[0]})")
    return missing


def stage_count(text: str) -> int:
    """An argparse type: a number of pipeline stages, at least 2.

    Raises:
        argparse.ArgumentTypeError: not an integer, or below 2.
    """
    return _whole_number(text, 2, "a pipeline needs at least 2 stages")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (seeds, steps, rounds).

    Raises:
        argparse.ArgumentTypeError: not an integer, or below 1 (``--steps -5`` reported a
            negative rate, ``--seeds -1`` an empty table blamed on missing data: helper-152).
    """
    return _whole_number(text, 1, "must be at least 1")


def _whole_number(text: str, least: int, why: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value}: {why}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0 (a time limit).

    Raises:
        argparse.ArgumentTypeError: not a number, not finite, or not above 0.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a number of seconds above 0")
    return value


def work_folder(parser: argparse.ArgumentParser, folder: Path | None) -> None:
    """Make ``--work`` (where a benchmark keeps each run) at once, or stop with a usage error
    (exit 2): one that cannot be written failed after every cell had trained, and the run
    still said "0 cells" with exit 0 (helper-152)."""
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot make the --work folder {folder} ({exc.strerror}): pass another --work")
    if not os.access(folder, os.W_OK):
        parser.error(f"cannot write into the --work folder {folder}: pass another --work")


def write_result(path: Path, text: str) -> None:
    """Write a result file atomically (:func:`pipeoptim.fileio.atomic_write`), its folder made
    if missing: a run stopped while writing leaves the committed result whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text.encode()))
