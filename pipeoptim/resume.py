"""Resuming a run of ``pipeoptim train`` from its checkpoint (``--resume``).

A resumed run continues the run it names: every setting not given anew on its command line is
that run's (:func:`inherit_settings`), and a setting given anew that would train another model
or another schedule is refused (:func:`check_resume`). Before, a resumed run took the command
line's defaults for what it was not told: resuming a run made with ``--checkpoint-every 30``
wrote no checkpoint, so the next resume went back to the first run's last checkpoint and
trained the epochs after it again, without a word (helper-98).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from pipeoptim.checkpoint import read_checkpoint
from pipeoptim.compiler.plan import Plan
from pipeoptim.errors import CheckpointError, PlanError, first_line
from pipeoptim.units import format_bytes

#: a run's link and runtime figures (:class:`pipeoptim.training.TrainConfig`), each passed to
#: ``compile`` under its own name
LINK_FIGURES = ("bandwidth", "latency", "allreduce_bandwidth", "allreduce_latency", "action_overhead")
#: settings of the run itself, not inherited: where it writes and what it resumes, whether it
#: shows progress, and the link and runtime figures of the machine it runs on (measured there);
#: ``plan`` is inherited as the run's record, a resumed run training on its checkpoint's plan
#: (:func:`on_run_plan`)
NOT_INHERITED = ("out", "resume", "progress", *LINK_FIGURES)
#: settings a resumed run must share with the run it continues (another value trains another
#: model, optimizer or schedule); momentum and weight decay come back from the checkpoint's
#: optimizer state, and another layout changes the staleness
MUST_MATCH = (
    *("task", "method", "gpus", "optimizer", "batch_size", "seed", "lr", "lr_schedule"),
    *("limit", "test_limit", "micro_batches", "momentum", "weight_decay", "stages", "data_parallel"),
    *("precision", "memory"),  # another precision computes otherwise; a memory limit is the plan's
)


def checkpoint_path(resume: str) -> Path:
    """The checkpoint ``--resume`` names: ``checkpoint.pt`` in a run folder (or a folder to
    be), else the file itself."""
    folder = Path(resume)
    return folder / "checkpoint.pt" if folder.is_dir() or not (folder.exists() or folder.suffix) else folder


def _missing(path: Path) -> str:
    """The fix where ``--resume`` names no checkpoint at ``path``: a run folder whose run saved
    none (no ``--checkpoint-every``) is said to be one (helper-103: "point it at a run folder"
    was said of a run folder)."""
    if (path.parent / "metrics.json").is_file():
        return (
            f"the run in {path.parent} saved no checkpoint (it ran without --checkpoint-every); start "
            "without --resume, and give --checkpoint-every N to a run you may want to resume"
        )
    return "start without --resume, or point it at a run folder"


def saved_config(path: Path) -> dict[str, Any]:
    """The settings the checkpoint at ``path`` was made with (``{}`` in one without them).

    Raises:
        CheckpointError: the checkpoint is missing or unreadable.
    """
    return dict(read_checkpoint(path, _missing(path))["extra"].get("config", {}))


def inherit_settings(config: Any, given: Collection[str]) -> Any:
    """``config`` (a :class:`pipeoptim.training.TrainConfig`, which imports this module) with
    each setting not in ``given`` (the fields set on the command line) taken from the checkpoint
    of the run ``config.resume`` continues, except :data:`NOT_INHERITED`; ``config`` itself where
    it resumes nothing.

    Raises:
        CheckpointError: the checkpoint is missing or unreadable.
    """
    if config.resume is None:
        return config
    saved = saved_config(checkpoint_path(config.resume))
    names = {f.name for f in fields(config)} - set(NOT_INHERITED) - set(given)
    return replace(config, **{name: saved[name] for name in names if name in saved})


def check_resume(config: Any, log: Callable[[str], None]) -> tuple[Path | None, Plan | None]:
    """The checkpoint to resume and the plan it holds (``None, None`` where the run resumes
    none; the plan ``None`` in a sequential run's), after checking it, the file read once.

    Says (through ``log``) where the run's ``metrics.json`` records more mini-batches than the
    checkpoint holds: those after it are trained again.

    Raises:
        CheckpointError: the checkpoint is missing or half-written, was made with another
            value of a :data:`MUST_MATCH` setting, or already has ``config.epochs`` epochs.
        PlanError: its plan is malformed.
    """
    if config.resume is None:
        return None, None
    path = checkpoint_path(config.resume)
    data = read_checkpoint(path, _missing(path))  # raises CheckpointError when missing or half-written
    saved = data["extra"].get("config", {})
    for key in MUST_MATCH:
        given = getattr(config, key)
        if key in saved and saved[key] != given and not _chosen(data, key, given):
            if key == "task":  # the positional TASK, not an option (named --task, helper-152)
                then, now = (f"task {v}" for v in (saved[key], given))
            else:
                option = f"--{key.replace('_', '-')}"
                shown = [
                    format_bytes(v) if key == "memory" and v is not None else v for v in (saved[key], given)
                ]
                then, now = (f"no {option}" if v is None else f"{option} {v}" for v in shown)
                planned = (
                    (data.get("plan") or {}).get("config", {}).get("num_stages" if key == "stages" else key)
                )
                if key in ("stages", "data_parallel") and saved[key] in (None, "auto") and planned:
                    then += f" (the planner chose {planned})"
            raise CheckpointError(
                f"cannot resume: the checkpoint was made with {then}, this run has {now}; "
                "use the same settings"
            )
    done = len(data["extra"].get("history", {}).get("epochs", []))
    if config.epochs <= done:
        raise CheckpointError(
            f"nothing to do: the checkpoint {path} already has {done} epochs; "
            f"resume with --epochs above {done} to train more"
        )
    recorded = _recorded_mini_batches(path.parent / "metrics.json")
    if recorded is not None and recorded > data["mini_batches"]:
        log(
            f"the checkpoint {path} holds mini-batch {data['mini_batches']} of the {recorded} that "
            f"{path.parent / 'metrics.json'} records: the {recorded - data['mini_batches']} after it are "
            "trained again (the run that made them wrote no later checkpoint)"
        )
    saved = data["plan"]
    return path, None if saved is None else Plan.from_dict(saved, f"the plan in {path}")


def _chosen(data: dict[str, Any], key: str, value: object) -> bool:
    """Whether ``value`` of ``--stages`` or ``--data-parallel`` is the layout the planner chose
    for the checkpoint's run, which left it to the planner (helper-99: ``--stages 2`` was refused
    on resuming a run whose planner had chosen 2 stages)."""
    field = {"stages": "num_stages", "data_parallel": "data_parallel"}.get(key)
    planned = (data.get("plan") or {}).get("config", {})
    saved = data["extra"].get("config", {}).get(key)
    return field is not None and saved in (None, "auto") and planned.get(field) == value


def _recorded_mini_batches(metrics: Path) -> int | None:
    """The mini-batches a run's ``metrics.json`` says it trained (``None``: no readable file)."""
    try:
        value = json.loads(metrics.read_text()).get("mini_batches")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def on_run_plan(
    build: Callable[[Any], Any],
    config: Any,
    path: Path | None,
    saved: Plan | None,
    log: Callable[[str], None],
) -> Any:
    """``build(plan)`` (the trainer) on the plan the run trains on: a resumed run's own,
    ``saved`` in its checkpoint at ``path`` (re-planned, a resume could land layers on other
    stages, or take another layout where the planner chose it, and train with other staleness
    than the run it continues); else ``config.plan``, the file ``--plan`` names (``None``:
    planned). A resumed run whose checkpoint's plan this model no longer takes (another graph
    after an upgrade of torch or of this package, a profile of an older version) is planned
    anew, as before plans were kept, and ``log`` says its stages may be cut elsewhere (a
    refusal left such a run no way to go on, helper-158).

    Raises:
        PlanError: ``--plan``'s plan is refused, or the new plan fails.
    """
    plan = config.plan if path is None else saved
    try:
        return build(plan)
    except PlanError as exc:
        if path is None or plan is None:
            raise
        log(
            f"the plan in {path} does not fit this model ({first_line(exc)}): the run is planned anew, "
            "and its stages may be cut elsewhere than before (other staleness for the asynchronous methods)"
        )
        return build(None)
