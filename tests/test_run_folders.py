"""What ``pipeoptim train`` leaves in a run folder over a run's life (helper-157): an earlier
run's files go as training starts, a resume into another folder too; ``metrics.json`` is
JSON to any parser; the rows reach ``train.csv`` before the checkpoint that covers them; a
checkpoint of the Python API resumes; another precision or memory limit is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import pipeoptim
from pipeoptim import training
from pipeoptim.cli.main import cli
from pipeoptim.records import read_rows
from pipeoptim.tasks import make_task

COMMON = ("digits", "--executor", "local", "--limit", "96", "--batch-size", "16", "--epochs", "1", "--quiet")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["train", *COMMON, *args])
    return result.exit_code, result.stdout, result.stderr


def strict(text: str) -> object:
    """JSON as any parser reads it: no NaN or Infinity."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))


def test_an_earlier_runs_files_go_as_training_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new run (or a resume of another folder's run) into a folder holding an earlier one:
    killed before its first epoch ended, it left the earlier run's metrics.json beside its own
    rows (and a resume into another folder its checkpoint, which a later --resume continued);
    what a kill at the loop's start would leave is this run's alone now."""
    earlier, source = tmp_path / "earlier", tmp_path / "source"
    code, _, err = run(
        "--gpus", "2", "--stages", "2", "--checkpoint-every", "3", "--plot", "--out", str(earlier)
    )
    assert code == 0, err
    code, _, err = run("--gpus", "2", "--stages", "2", "--checkpoint-every", "3", "--out", str(source))
    assert code == 0, err
    on_disk = []

    def loop(config, task, trainer, scheduler, run, log) -> None:  # what a kill -9 here leaves
        names = sorted(p.name for p in run.out.iterdir())
        on_disk.append((names, json.loads((run.out / "metrics.json").read_text())))

    monkeypatch.setattr(training, "_loop", loop)
    pipeline = ["metrics.json", "plan.json", "train.csv"]  # no checkpoint or pictures
    cases = [
        (["--gpus", "2", "--stages", "2", "--method", "gpipe"], "gpipe", pipeline),
        (["--method", "sequential"], "sequential", ["metrics.json", "train.csv"]),  # no plan.json
        (["--gpus", "2", "--stages", "2", "--resume", str(source), "--epochs", "2"], "pipeoptim", pipeline),
    ]
    for args, method, left in cases:
        folder = tmp_path / f"again{len(on_disk)}"
        folder.mkdir()
        for name in ("metrics.json", "checkpoint.pt", "curves.png", "plan.png", "plan.json", "train.csv"):
            (folder / name).write_bytes((earlier / name).read_bytes())
        code, _, err = run(*args, "--out", str(folder))
        assert code == 0, err
        assert f"{folder} holds an earlier run (metrics.json, checkpoint.pt): this run replaces it" in err
        names, metrics = on_disk[-1]
        assert names == left
        assert metrics["status"] == "running" and metrics["config"]["method"] == method
    assert on_disk[2][1]["mini_batches"] == 6  # the resumed run's, restored from source's checkpoint


def test_a_diverged_runs_metrics_are_json_with_nulls(tmp_path: Path) -> None:
    out = tmp_path / "nan"
    code, stdout, err = run(
        "--gpus", "2", "--stages", "2", "--lr", "1e8", "--nan-check", "off", "--json", "--out", str(out)
    )
    assert code == 0, err
    printed, written = strict(stdout), strict((out / "metrics.json").read_text())
    assert printed == written and written["epochs"][0]["train_loss"] is None


def test_the_rows_reach_train_csv_before_the_checkpoint_covering_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill right after the checkpoint was written left rows it covers unwritten, a gap that
    a resume kept: the rows are on disk first now."""
    seen = []
    save = pipeoptim.Pipeline.save_checkpoint

    def checked(self, path, extra=None) -> None:
        seen.append((self.mini_batches_done, len(read_rows(Path(path).parent / "train.csv"))))
        save(self, path, extra)

    monkeypatch.setattr(pipeoptim.Pipeline, "save_checkpoint", checked)
    code, _, err = run(
        "--gpus",
        "2",
        "--stages",
        "2",
        "--checkpoint-every",
        "4",
        "--record-every",
        "5",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 0, err
    assert seen == [(4, 4), (6, 6)]


def test_a_checkpoint_of_the_python_api_resumes_on_the_command_line(tmp_path: Path) -> None:
    """pipe.save_checkpoint keeps no learning-rate schedule: a KeyError before."""
    task = make_task("digits", batch_size=16, limit=96)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.02, momentum=0.9)
    with pipeoptim.compile(
        task.model,
        optimizer,
        2,
        example_inputs=task.example_inputs,
        loss_fn=F.cross_entropy,
        executor="local",
    ) as pipe:
        for inputs, targets in list(task.batches(0))[:3]:
            pipe.step(inputs, targets)
        pipe.save_checkpoint(tmp_path / "api.pt")
    code, _, err = run(
        "--gpus",
        "2",
        "--stages",
        "2",
        "--epochs",
        "2",
        "--resume",
        str(tmp_path / "api.pt"),
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    assert "holds no learning-rate schedule: cosine goes on from its mini-batch" in err
    lrs = [float(row[3]) for row in read_rows(tmp_path / "o" / "train.csv")]
    assert lrs[0] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * 3 / 12)))


@pytest.mark.parametrize(
    "option, shown", [(["--precision", "bfloat16"], "bfloat16"), (["--memory", "64MiB"], "64.00 MiB")]
)
def test_a_resume_with_another_precision_or_memory_limit_is_refused(
    option: list[str], shown: str, tmp_path: Path
) -> None:
    out = tmp_path / "r"
    code, _, err = run("--gpus", "2", "--stages", "2", "--checkpoint-every", "3", "--out", str(out))
    assert code == 0, err
    code, _, err = run("--epochs", "2", "--resume", str(out), *option)
    assert code == 1 and f"this run has {option[0]} {shown}; use the same settings" in err, err


def test_the_stages_wait_timeout_is_an_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped stage kept a run waiting the fixed 300 s before it failed (helper-157):
    --timeout reaches compile; 0 is a usage error."""
    given = []
    compile_ = pipeoptim.compile

    def recording(*args, **kwargs):
        given.append(kwargs["timeout"])
        return compile_(*args, **kwargs)

    monkeypatch.setattr(pipeoptim, "compile", recording)
    code, _, err = run("--gpus", "2", "--stages", "2", "--timeout", "7.5", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert (
        given == [7.5]
        and json.loads((tmp_path / "r" / "metrics.json").read_text())["config"]["timeout"] == 7.5
    )
    code, _, err = run("--timeout", "0", "--out", str(tmp_path / "z"))
    assert code == 2 and "--timeout" in err
