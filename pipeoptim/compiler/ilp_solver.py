"""Running the partition ILP's solver (PuLP with HiGHS or CBC): choosing the solver, a warm
start for HiGHS, the solver's output discarded, and the optimality gap it reports
(:mod:`pipeoptim.compiler.milp` builds the model)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pulp

from pipeoptim.errors import PlanError

#: the names :func:`resolve_solver` takes
SOLVERS = ("auto", "cbc", "highs")


def resolve_solver(name: str) -> str:
    """``"auto"`` is HiGHS where ``highspy`` is installed, else CBC; other names pass through.

    Raises:
        PlanError: an unknown name, or ``"highs"`` without ``highspy``.
    """
    if name == "auto":
        return "highs" if pulp.HiGHS().available() else "cbc"
    if name == "highs" and not pulp.HiGHS().available():
        raise PlanError("solver 'highs' is not installed: pip install highspy (or use --solver cbc)")
    if name not in SOLVERS:
        raise PlanError(f"unknown solver {name!r}; choose {', '.join(SOLVERS)}")
    return name


class _WarmHiGHS(pulp.HiGHS):
    """PuLP's HiGHS interface, given the variables' initial values as a starting solution
    (PuLP 3.3 passes none to HiGHS)."""

    def callSolver(self, lp: pulp.LpProblem) -> None:
        import highspy

        start = highspy.HighsSolution()
        start.col_value = [var.varValue or 0.0 for var in sorted(lp.variables(), key=lambda v: v.index)]
        start.value_valid = True
        lp.solverModel.setSolution(start)
        super().callSolver(lp)


def _solver(name: str, time_limit: float, gap: float, warm: bool, log_path: str | None) -> pulp.LpSolver:
    if name == "highs":
        cls = _WarmHiGHS if warm else pulp.HiGHS
        return cls(msg=False, timeLimit=time_limit, threads=1, gapRel=gap)
    with warnings.catch_warnings():  # PuLP 3.3 deprecates the bundled CBC for PuLP 4
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(
            msg=False,
            timeLimit=time_limit,
            threads=1,
            gapRel=gap,
            warmStart=warm,
            logPath=log_path,
        )


@contextlib.contextmanager
def _solver_output_discarded() -> Iterator[None]:
    """Discard what the solver libraries print on file descriptor 1: with its messages off,
    HiGHS still prints a two-line banner when a process first makes a solver, which went to
    standard error (a Python API user's ``compile`` printed it where CBC printed nothing,
    helper-166); standard output carries only the caller's results. Their errors reach
    PuLP as statuses and exceptions, not as text."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (a closed stdout): nothing to protect
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def solve_ilp(
    prob: pulp.LpProblem, solver: str, time_limit: float, warm: bool, gap: float = 1e-4
) -> tuple[str, bool, float | None]:
    """Solve; return (status text, proven optimal, relative gap)."""
    with tempfile.TemporaryDirectory() as tmp:
        log_path = str(Path(tmp) / "cbc.log") if solver == "cbc" else None
        with _solver_output_discarded():
            prob.solve(_solver(solver, time_limit, gap, warm, log_path))
        log = Path(log_path).read_text() if log_path and Path(log_path).exists() else ""
    if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
        return "infeasible", False, None
    if prob.sol_status == pulp.LpSolutionOptimal:
        return "optimal", True, 0.0
    if prob.sol_status in (pulp.LpSolutionIntegerFeasible, pulp.LpSolutionOptimal):
        return "feasible (time limit)", False, _gap(prob, solver, log)
    return f"no solution ({pulp.LpStatus[prob.status]})", False, None


def _gap(prob: pulp.LpProblem, solver: str, log: str) -> float | None:
    if solver == "highs":
        info = prob.solverModel.getInfo()
        return float(info.mip_gap)
    obj = re.search(r"Objective value:\s*([-\d.eE+]+)", log)
    bound = re.search(r"Lower bound:\s*([-\d.eE+]+)", log)
    if obj and bound:
        o, b = float(obj.group(1)), float(bound.group(1))
        return abs(o - b) / max(abs(o), 1e-12)
    return None
