"""``pipeoptim train --plan``: a run trains on a saved plan (its layout and cut) instead of
planning, every run folder keeps its plan (``plan.json``), and a resumed run trains on its
checkpoint's plan, whatever a new profile would cut."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeoptim.cli.main import cli
from pipeoptim.compiler.plan import Plan


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["train", "digits", *args, "--quiet", "--executor", "local"])
    return result.exit_code, result.stdout, result.stderr


def losses(folder: Path) -> list[str]:
    with open(folder / "train.csv") as f:
        return [row[2] for row in list(csv.reader(f))[1:]]


COMMON = ("--limit", "128", "--batch-size", "16", "--lr-schedule", "constant")


def test_a_run_on_another_runs_plan_takes_its_cut_without_profiling(tmp_path: Path) -> None:
    """The second run, on an empty profile folder, profiles nothing and plans nothing: it
    trains the first run's 3 stages with the first run's cut (its ``plan.json`` is the first's),
    and with the same seed every loss is the first run's; a plan for another method, for more
    devices than ``--gpus`` or with ``--resume`` or ``--method sequential`` is refused."""
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = run(
        *COMMON,
        "--gpus",
        "3",
        "--stages",
        "3",
        "--epochs",
        "1",
        "--checkpoint-every",
        "4",  # as the second run's (a checkpoint flushes the asynchronous pipeline)
        "--out",
        str(first),
        "--profile-dir",
        str(tmp_path / "p1"),
    )
    assert code == 0, err
    assert "profiling" in err
    saved = first / "plan.json"
    # the task's loss is priced on the last stage (pipeoptim.loss_cost), as the log says
    assert "loss on the last stage (timed)" in err and Plan.load(saved).summary["loss"]["bwd_s"] > 0
    code, _, err = run(
        *COMMON,
        "--gpus",
        "4",
        "--plan",
        str(saved),
        "--epochs",
        "1",
        "--checkpoint-every",
        "4",
        "--out",
        str(second),
        "--profile-dir",
        str(tmp_path / "p2"),
    )
    assert code == 0, err
    assert "using the given plan" in err and "profiling" not in err
    assert Plan.load(second / "plan.json").stage_of == Plan.load(saved).stage_of
    assert "layouts" in Plan.load(saved).summary  # the first run's search, not the second's:
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["layout"] == {"stages": 3, "data_parallel": 1}  # (helper-158)
    assert metrics["config"]["plan"] == str(saved) and saved.is_absolute()
    assert losses(second) == losses(first) and len(losses(first)) == 8
    code, _, err = run("--epochs", "2", "--resume", str(second))
    assert code == 0, err  # the resumed run records the plan file the run was given
    assert json.loads((second / "metrics.json").read_text())["config"]["plan"] == str(saved)
    code, _, err = run(*COMMON, "--method", "gpipe", "--plan", str(saved), "--out", str(tmp_path / "x"))
    assert code == 1 and "the plan is for method='pipeoptim', this pipeline has method='gpipe'" in err
    code, _, err = run(*COMMON, "--gpus", "2", "--plan", str(saved), "--out", str(tmp_path / "x"))
    assert code == 1 and "(3 devices), more than the 2 given" in err
    code, _, err = run(*COMMON, "--plan", str(saved), "--resume", str(first))
    assert code == 2 and "leave --plan out" in err
    code, _, err = run(*COMMON, "--method", "sequential", "--plan", str(saved), "--out", str(tmp_path / "x"))
    assert code == 2 and "--plan does not apply to --method sequential" in err


def test_a_resumed_run_trains_on_its_checkpoints_plan(tmp_path: Path) -> None:
    """Resumed with another, empty profile folder, the run profiles and plans nothing (a new
    profile could cut elsewhere, or the planner choose another layout, and the resumed
    run train with other staleness) and ends as the uninterrupted run."""
    common = (*COMMON, "--gpus", "3", "--stages", "3", "--checkpoint-every", "4")
    whole, part = tmp_path / "whole", tmp_path / "part"
    code, _, err = run(*common, "--epochs", "2", "--out", str(whole), "--profile-dir", str(tmp_path / "p1"))
    assert code == 0, err
    code, _, err = run(*common, "--epochs", "1", "--out", str(part), "--profile-dir", str(tmp_path / "p1"))
    assert code == 0, err
    code, _, err = run("--epochs", "2", "--resume", str(part), "--profile-dir", str(tmp_path / "p3"))
    assert code == 0, err
    assert "resumed from" in err and "using the given plan" in err and "profiling" not in err
    assert losses(part) == losses(whole) and len(losses(whole)) == 16
    assert Plan.load(part / "plan.json").stage_of == Plan.load(whole / "plan.json").stage_of


def test_a_resume_whose_checkpoint_plan_no_longer_fits_is_planned_anew_and_says_so(tmp_path: Path) -> None:
    """A checkpoint's plan for another graph (an upgrade of torch or of this package changes the
    hash) failed the resume with "leave plan unset", which a resume cannot do (helper-158)."""
    part = tmp_path / "part"
    common = (*COMMON, "--gpus", "2", "--stages", "2", "--checkpoint-every", "4")
    code, _, err = run(*common, "--epochs", "1", "--out", str(part), "--profile-dir", str(tmp_path / "p"))
    assert code == 0, err
    saved = torch.load(part / "checkpoint.pt", weights_only=True)
    saved["plan"]["profile_key"]["graph_hash"] = "0" * 64
    torch.save(saved, part / "checkpoint.pt")
    code, _, err = run("--epochs", "2", "--resume", str(part), "--profile-dir", str(tmp_path / "p"))
    assert code == 0, err
    assert "does not fit this model (the plan was made for another model graph" in err
    assert "the run is planned anew, and its stages may be cut elsewhere" in err
    assert len(losses(part)) == 16


def test_a_checkpoint_given_as_the_plan_gives_its_runs_cut(tmp_path: Path) -> None:
    """``pipe.save_checkpoint`` keeps the plan, but ``load_checkpoint`` leaves the pipeline's
    own, and ``plan=checkpoint`` was "not a plan file" (helper-161): it reads the checkpoint's."""
    import pipeoptim
    from pipeoptim.errors import PlanError
    from pipeoptim.tasks import make_task

    task = make_task("digits", batch_size=16, limit=64)
    options = dict(
        example_inputs=task.example_inputs, loss_fn=task.loss_fn, executor="local", profile_dir=None
    )
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
    with pipeoptim.compile(task.model, opt, 3, **options, memory="1GiB") as pipe:
        pipe.save_checkpoint(tmp_path / "ck.pt")
        planned = pipe.plan
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
    with pipeoptim.compile(task.model, opt, 3, **options, plan=tmp_path / "ck.pt") as pipe:
        assert pipe.plan.stage_of == planned.stage_of and pipe.plan.config.memory_limit == 2**30
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    saved["plan"] = None
    torch.save(saved, tmp_path / "none.pt")
    with pytest.raises(PlanError, match="holds no plan"):
        pipeoptim.compile(task.model, opt, 3, **options, plan=tmp_path / "none.pt")
