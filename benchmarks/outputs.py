"""Where a benchmark writes its results: only a full run replaces the committed ones."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir(
    parser: argparse.ArgumentParser, args: argparse.Namespace, prefix: str, scope: Iterable[str] = ()
) -> Path:
    """``args.out`` when given; :data:`RESULTS` (``benchmarks/results``, wherever the script is
    started from) for the full run: no ``--quick`` and every option named in ``scope`` (those
    that measure a part or a variant: stage counts, methods, seeds, steps) at its default;
    otherwise a new temporary folder. A run of two methods at 2 stages once replaced the
    committed 4-stage breakdown of all five.

    Raises:
        AttributeError: ``scope`` names an option the parser does not have.
    """
    if args.out is not None:
        return Path(args.out)
    full = not getattr(args, "quick", False) and all(
        getattr(args, name) == parser.get_default(name) for name in scope
    )
    return RESULTS if full else Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
