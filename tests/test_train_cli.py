"""``pipeoptim train`` end to end: accuracy, records, plot, checkpoints and resume."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pipeoptim
from pipeoptim import training
from pipeoptim.cli.main import cli
from pipeoptim.fileio import held_folder
from pipeoptim.optimizers import make_optimizer
from pipeoptim.tasks import make_task


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["train", *args, "--quiet"])
    return result.exit_code, result.stdout, result.stderr


def rows(path: Path) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))[1:]


@pytest.mark.slow
def test_digits_four_stages_processes_pipeoptim_reaches_90_percent(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout, err = run(
        "digits",
        "--gpus",
        "4",
        "--stages",
        "4",
        "--method",
        "pipeoptim",
        "--epochs",
        "4",
        "--out",
        str(out),
        "--plot",
        "--profile-dir",
        str(tmp_path / "profiles"),
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["accuracy"] > 0.9
    assert len(metrics["epochs"]) == 4 and metrics["plan"]["bottleneck_s"] > 0
    assert len(metrics["stages"]) == 4
    steps = rows(out / "train.csv")
    assert len(steps) == metrics["mini_batches"] == 4 * (1437 // 32)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in stdout


@pytest.mark.slow
def test_to_module_reproduces_the_pipelines_outputs_with_worker_processes(tmp_path: Path) -> None:
    task = make_task("digits", batch_size=32, seed=0, limit=256)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(
        task.model,
        opt,
        4,
        example_inputs=task.example_inputs,
        loss_fn=task.loss_fn,
        executor="processes",
        profile_dir=tmp_path,
    ) as pipe:
        for _ in pipe.train(task.batches(0)):
            pass
        x = task.example_inputs[0]
        expected = pipe.predict((x,))
        module = pipe.to_module()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [["--gpus", "3", "--stages", "3"], ["--method", "sequential"]])
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, layout: list[str]) -> None:
    """The sequential reference saved neither the global generator its dropout draws from nor
    its loss scale: its resumed run diverged at the first mini-batch after the resume."""
    common = [
        "digits",
        *layout,
        "--executor",
        "local",
        "--limit",
        "320",
        "--batch-size",
        "32",
        "--checkpoint-every",
        "4",
        "--lr-schedule",
        "constant",
        "--profile-dir",
        str(tmp_path / "profiles"),
    ]
    code, _, err = run(*common, "--epochs", "3", "--out", str(tmp_path / "whole"))
    assert code == 0, err
    code, _, err = run(*common, "--epochs", "1", "--out", str(tmp_path / "part"))
    assert code == 0, err
    code, _, err = run(
        *common, "--epochs", "3", "--out", str(tmp_path / "part"), "--resume", str(tmp_path / "part")
    )
    assert code == 0, err
    assert "resumed from" in err
    whole, part = rows(tmp_path / "whole" / "train.csv"), rows(tmp_path / "part" / "train.csv")
    assert len(whole) == 30 and whole == part
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())["epochs"]
    b = json.loads((tmp_path / "part" / "metrics.json").read_text())["epochs"]
    assert [e["accuracy"] for e in a] == [e["accuracy"] for e in b]
    # an epoch's rate is of training: the checkpoints' flushes and saves (every 4 of its 10
    # mini-batches) are timed apart
    for epoch in a:
        assert 0 < epoch["checkpoint_s"] < epoch["seconds"]
        assert epoch["mini_batches_per_s"] == pytest.approx(10 / (epoch["seconds"] - epoch["checkpoint_s"]))


def test_resume_with_more_epochs_follows_the_longer_cosine_schedule(tmp_path: Path) -> None:
    common = [
        "digits",
        "--gpus",
        "2",
        "--stages",
        "2",
        "--executor",
        "local",
        "--limit",
        "320",
        "--batch-size",
        "32",
    ]
    common += ["--checkpoint-every", "5", "--lr", "0.02", "--profile-dir", str(tmp_path / "profiles")]
    code, _, err = run(*common, "--epochs", "1", "--out", str(tmp_path / "a"))
    assert code == 0, err
    code, _, err = run(
        *common, "--epochs", "3", "--out", str(tmp_path / "a"), "--resume", str(tmp_path / "a")
    )
    assert code == 0, err
    steps = rows(tmp_path / "a" / "train.csv")
    assert [int(r[0]) for r in steps] == list(range(30))
    first = [0.02 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    longer = [0.02 * 0.5 * (1 + math.cos(math.pi * s / 30)) for s in range(10, 30)]
    assert [float(r[3]) for r in steps] == pytest.approx(first + longer, rel=1e-9, abs=1e-12)
    assert all(math.isfinite(float(r[2])) and float(r[2]) < 3 for r in steps)
    code, _, err = run(
        *common, "--epochs", "3", "--lr", "0.1", "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a")
    )
    assert code == 1 and "--lr 0.02" in err and "--lr 0.1" in err
    (tmp_path / "a" / "train.csv").unlink()  # its rows were dropped without a word (helper-136)
    code, _, err = run(
        *common, "--epochs", "4", "--out", str(tmp_path / "c"), "--resume", str(tmp_path / "a")
    )
    assert code == 0 and f"{tmp_path / 'a' / 'train.csv'} is missing or holds no rows" in err, err
    assert [int(r[0]) for r in rows(tmp_path / "c" / "train.csv")] == list(range(30, 40))


def test_sequential_reference_and_bad_resume(tmp_path: Path) -> None:
    code, out, err = run(
        "digits", "--method", "sequential", "--epochs", "1", "--limit", "320", "--out", str(tmp_path / "seq")
    )
    assert code == 0, err and "sequential" in out
    assert "holds an earlier run" not in err
    code, out, err = run(  # the same folder again: said, not silently replaced
        "digits", "--method", "sequential", "--epochs", "1", "--limit", "320", "--out", str(tmp_path / "seq")
    )
    assert code == 0, err
    assert (
        f"{tmp_path / 'seq'} holds an earlier run (metrics.json): this run replaces it once it starts "
        "training; pass another --out to keep it"
    ) in err
    (tmp_path / "seq" / "checkpoint.pt").write_bytes(b"earlier")  # a pipelined run's: --resume is named
    # a run that fails before it trains (here its plan) keeps it: it was removed first (helper-136)
    code, _, err = run("digits", "--epochs", "1", "--memory", "1KiB", "--out", str(tmp_path / "seq"))
    assert code == 1 and "no layout of 4 devices is feasible in 1.00 KiB per device" in err
    assert (tmp_path / "seq" / "checkpoint.pt").read_bytes() == b"earlier"
    code, _, err = run(
        "digits", "--method", "sequential", "--epochs", "1", "--limit", "320", "--out", str(tmp_path / "seq")
    )
    replaces = "(metrics.json, checkpoint.pt): this run replaces it once it starts training; pass --resume"
    assert f"{replaces} {tmp_path / 'seq'} to" in err
    # replaced means gone: the earlier checkpoint stayed beside this run's records, and a
    # --resume of this folder then continued the earlier run
    assert code == 0, err
    assert not (tmp_path / "seq" / "checkpoint.pt").exists()
    code, _, err = run("digits", "--epochs", "2", "--resume", str(tmp_path / "seq"))  # a run that saved none
    assert (
        code == 1
        and f"the run in {tmp_path / 'seq'} saved no checkpoint (it ran without --checkpoint-every)" in err
    )
    code, _, err = run(
        "digits", "--epochs", "1", "--out", str(tmp_path / "x"), "--resume", str(tmp_path / "nope")
    )
    assert code == 1 and "no checkpoint" in err
    assert not (tmp_path / "x").exists()  # a run that failed before writing leaves no empty folder
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run(
        "digits", "--epochs", "1", "--out", str(tmp_path / "y"), "--resume", str(tmp_path / "half")
    )
    assert code == 1 and "unreadable" in err
    code, _, err = run(
        "digits",
        "--method",
        "sequential",
        "--epochs",
        "1",
        "--limit",
        "320",
        "--out",
        str(tmp_path / "z"),
        "--resume",
        str(tmp_path / "seq"),
        "--gpus",
        "2",
    )
    assert code == 1 and "checkpoint" in err


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = run("fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "f"))
    assert code == 1 and "--data-dir" in err and "Traceback" not in err


def test_fashion_mnist_from_idx_files(tmp_path: Path) -> None:
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{folder} is absent (Debian package dataset-fashion-mnist)")
    task = make_task("fashion-mnist", batch_size=64, seed=0, limit=3200)
    assert task.example_inputs[0].shape == (64, 1, 28, 28) and task.info["test_examples"] == 10_000
    code, _, err = run(
        "fashion-mnist",
        "--gpus",
        "2",
        "--stages",
        "2",
        "--executor",
        "local",
        "--limit",
        "3200",
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--optimizer",
        "adam",
        "--out",
        str(tmp_path / "f"),
        "--profile-dir",
        str(tmp_path / "profiles"),
    )
    assert code == 0, err
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["final"]["accuracy"] > 0.6


def test_resume_refuses_another_limit_or_micro_batches_and_says_when_nothing_is_left(tmp_path: Path) -> None:
    common = [
        "digits",
        "--gpus",
        "2",
        "--stages",
        "2",
        "--method",
        "1f1b",
        "--executor",
        "local",
        "--batch-size",
        "32",
    ]
    common += ["--out", str(tmp_path / "rk"), "--profile-dir", str(tmp_path / "profiles")]
    code, _, err = run(*common, "--limit", "64", "--epochs", "2", "--checkpoint-every", "1")
    assert code == 0, err
    before = (tmp_path / "rk" / "metrics.json").read_text()
    resume = ["--resume", str(tmp_path / "rk")]
    code, _, err = run(*common, *resume, "--limit", "128", "--epochs", "3")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "made with --limit 64, this run has --limit 128" in err
    code, _, err = run(*common, *resume, "--limit", "64", "--micro-batches", "4", "--epochs", "3")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "made with no --micro-batches, this run has --micro-batches 4" in err
    # these were accepted, ignored (the checkpoint's optimizer state brings its own momentum and
    # weight decay back) and recorded in metrics.json as if used
    # helper-124: another --test-limit evaluated later epochs on another test subset
    changed = (("--momentum", "0.9", "0.0"), ("--weight-decay", "0.0", "0.5"), ("--test-limit", "no", "50"))
    for option, then, now in changed:
        code, _, err = run(*common, *resume, "--limit", "64", option, now, "--epochs", "3")
        made = f"no {option}" if then == "no" else f"{option} {then}"
        assert code == 1 and f"made with {made}, this run has {option} {now}" in err
    code, _, err = run(*common[:3], *common[5:], *resume, "--limit", "64", "--stages", "1", "--epochs", "3")
    assert code == 1 and "made with --stages 2, this run has --stages 1" in err
    for epochs in ("1", "2"):
        code, _, err = run(*common, *resume, "--limit", "64", "--epochs", epochs)
        assert code == 1 and len(err.strip().splitlines()) == 1
        assert "nothing to do" in err and "already has 2 epochs" in err
    assert (tmp_path / "rk" / "metrics.json").read_text() == before  # refused runs leave it alone


def test_a_limit_below_one_mini_batch_is_a_one_line_error(tmp_path: Path) -> None:
    code, _, err = run(
        "digits", "--gpus", "2", "--stages", "2", "--limit", "1", "--out", str(tmp_path / "rl1"),
        "--executor", "local", "--epochs", "1", "--profile-dir", str(tmp_path / "profiles"),
    )  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "the 1 training examples (after --limit, where given) give no full mini-batch of 32" in err
    assert not (tmp_path / "rl1").exists()


def test_summary_line_counts_stages_and_epochs_in_words() -> None:
    from pipeoptim.records import summary_line

    base = {"metric": "accuracy", "final": {"accuracy": 0.5}, "mini_batches": 8, "wall_s": 1.0}
    one = {**base, "config": {"task": "digits", "method": "gpipe"}, "epochs": [{}]}
    one["layout"] = {"stages": 1, "data_parallel": 1}
    assert summary_line(one).startswith("digits gpipe (1 stage): test accuracy 0.5000 after 1 epoch,")
    two = {**one, "layout": {"stages": 2, "data_parallel": 2}, "epochs": [{}, {}]}
    assert summary_line(two).startswith(
        "digits gpipe (2 stages x 2 replicas): test accuracy 0.5000 after 2 epochs,"
    )
    plain = {**one, "config": {"task": "digits", "method": "sequential"}, "layout": None}
    assert summary_line(plain).startswith("digits sequential: test accuracy")
    assert "after 1 epoch, 1 mini-batch, 1.0 s" in summary_line({**one, "mini_batches": 1})  # helper-157


def test_the_progress_rate_is_of_training_and_the_eta_counts_evaluations(monkeypatch) -> None:
    """The plain progress line divided the mini-batches by the wall time since the start, the
    epochs' evaluations and checkpoints included, under the name of a training rate."""
    import pipeoptim.records as records

    now = [100.0]
    monkeypatch.setattr(records.time, "perf_counter", lambda: now[0])
    lines: list[str] = []
    progress = records.Progress(total=40, done=0, every=10, log=lines.append)
    for _ in range(10):  # 10 mini-batches in 1 s of training
        now[0] += 0.1
        progress.update(0, 2, 0.5)
    with progress.paused():  # an evaluation of 4 s
        now[0] += 4.0
    for _ in range(10):
        now[0] += 0.1
        progress.update(1, 2, 0.25)
    # 20 mini-batches in 2 s of training: 10/s; 20 left: 2 s of training + 20 x 0.2 s paused
    assert lines == [
        "mini-batch 10/40 (25%), epoch 1/2, loss 0.5000, 10.0 mini-batches/s, ETA 0m03s",
        "mini-batch 20/40 (50%), epoch 2/2, loss 0.2500, 10.0 mini-batches/s, ETA 0m06s",
    ]


def test_train_data_parallel_auto_is_the_default_search(tmp_path: Path) -> None:
    """``--data-parallel auto`` (as ``partition`` takes it) leaves the layout to the planner,
    and an impossible layout limit names the bytes as well as the rounded size."""
    common = ["train", "digits", "--gpus", "2", "--method", "gpipe", "--executor", "local", "--limit", "64"]
    common += ["--epochs", "1", "--quiet", "--profile-dir", str(tmp_path / "profiles")]
    result = CliRunner().invoke(cli, [*common, "--data-parallel", "auto", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["layout"]["stages"] >= 1
    result = CliRunner().invoke(cli, [*common, "--memory", "1KiB", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1
    assert "needs" in result.stderr and "bytes) per device" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "pipeoptim", "--micro-batches", "3"], "method pipeoptim runs each mini-batch as one"),
        (["--method", "sequential", "--stages", "2"], "--stages does not apply to --method sequential"),
        (
            ["--method", "sequential", "--data-parallel", "2", "--micro-batches", "2"],
            "--data-parallel and --micro-batches do not apply to --method sequential",
        ),
        (
            ["--method", "sequential", "--latency", "measure", "--action-overhead", "0"],
            "--latency and --action-overhead do not apply to --method sequential",
        ),
    ],
)
def test_layout_options_a_method_would_ignore_are_refused_before_planning(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    """Refused at once (exit 2, click's usage errors), naming the option: nothing is profiled
    or written."""
    args = ["train", "digits", "--out", str(tmp_path / "run"), "--profile-dir", str(tmp_path / "p"), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()


def test_an_out_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["train", "digits", "--out", str(blocker / "run"), "--quiet"])
    assert result.exit_code == 1
    assert f"cannot create the run folder {blocker / 'run'}" in result.output
    assert "choose a writable --out" in result.output


@pytest.mark.slow
def test_the_plan_of_a_run_counts_the_given_runtime_costs(tmp_path: Path) -> None:
    """--action-overhead and --latency reach the plan the run uses (3 actions and, at 2
    stages, 2 messages per stage and mini-batch of asynchronous 1F1B)."""
    out = tmp_path / "run"
    code, _, err = run(
        "digits",
        "--gpus",
        "2",
        "--stages",
        "2",
        "--epochs",
        "1",
        "--limit",
        "128",
        "--action-overhead",
        "5e-4",
        "--latency",
        "1e-4",
        "--out",
        str(out),
        "--profile-dir",
        str(tmp_path / "profiles"),
    )
    assert code == 0, err
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert [s["overhead_s"] for s in stages] == pytest.approx([1.5e-3, 1.5e-3])
    code, _, err = run("digits", "--action-overhead", "-1", "--out", str(tmp_path / "bad"))
    assert code == 2 and "neither 'measure' nor a number of seconds from 0 to 3600" in err


@pytest.mark.parametrize("option", ["--lr", "--momentum", "--weight-decay", "--max-grad-norm"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_hyperparameters_that_are_not_finite_are_refused_at_once(option: str, value: str, tmp_path) -> None:
    """NaN passes every bound check: --lr nan measured, profiled and started the workers, then
    failed as a NaN loss, and --max-grad-norm nan read as 'no layout is feasible'."""
    code, _, err = run("digits", "--gpus", "2", option, value, "--out", str(tmp_path))
    assert code == 2 and f"Invalid value for '{option}': " in err, err  # not finite, or out of range
    assert not any(tmp_path.iterdir())


def test_json_prints_the_metrics_and_failures_as_objects(tmp_path) -> None:
    """train had no --json (the brief: both commands follow click conventions, --json among
    them), and a failing --json command printed nothing on stdout for a script to parse."""
    args = ["digits", "--method", "sequential", "--epochs", "1", "--limit", "64", "--json"]
    code, out, err = run(*args, "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads(out) == json.loads((tmp_path / "run" / "metrics.json").read_text())
    code, out, err = run("digits", "--lr", "nan", "--json", "--out", str(tmp_path / "bad"))
    assert code == 2 and json.loads(out) == {
        "error": "Invalid value for '--lr': 'nan' is not a finite number",
        "exit_code": 2,
    }
    result = CliRunner().invoke(cli, ["partition", "mlp", "--gpus", "2", "--stages", "4", "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout) == {  # a usage error (helper-136)
        "error": "--stages 4 needs 4 devices but --gpus is 2: raise --gpus to 4 or lower --stages",
        "exit_code": 2,
    }
    assert "Error: --stages 4 needs 4 devices" in result.stderr  # the message stays on stderr too


def test_a_data_dir_digits_would_ignore_is_refused(tmp_path) -> None:
    """digits ships with scikit-learn: --data-dir /nonexistent was silently ignored (exit 0)."""
    code, _, err = run("digits", "--data-dir", "/nonexistent", "--out", str(tmp_path))
    assert code == 1 and "digits ships with scikit-learn and reads no data folder ('/nonexistent')" in err


def test_ctrl_c_with_json_prints_an_object_on_stdout(tmp_path, monkeypatch) -> None:
    """A run stopped by Ctrl-C exits with 130; with --json stdout stayed empty, where every
    other failure prints {"error", "exit_code"} for a script to read."""
    import pipeoptim.cli.train as train_module

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    args = ["digits", "--method", "sequential", "--json", "--out", str(tmp_path / "run")]
    code, out, err = run(*args)
    assert code == 130 and json.loads(out) == {"error": "interrupted", "exit_code": 130}
    assert "interrupted: no stage is left running" in err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--stages", "3", "--gpus", "2"], 2, "--stages 3 needs 3 devices but --gpus is 2: raise --gpus"),
        (["--stages", "2", "--data-parallel", "2", "--gpus", "3"], 2, "2 stages x 2 replicas need 4 devices"),
        (["--resume", "{tmp}/nothing"], 1, "no checkpoint at {tmp}/nothing/checkpoint.pt: start without"),
        (["--data-dir", "{tmp}"], 1, "not found in {tmp}: pass --data-dir"),
        (["--out", "{tmp}/file/run"], 1, "cannot create the run folder {tmp}/file/run"),
        (
            ["--method", "gpipe", "--micro-batches", "40", "--batch-size", "32"],
            2,
            "Invalid value for '--micro-batches': --micro-batches 40 splits each mini-batch into 40 parts, "
            "but --batch-size 32 gives it 32 rows",
        ),
        (
            ["--data-parallel", "4", "--batch-size", "2"],
            2,
            "give --batch-size 4 or more, or a smaller --data",
        ),
        (
            ["--method", "1f1b", "--micro-batches", "4", "--data-parallel", "2", "--batch-size", "6"],
            2,
            "Invalid value for '--micro-batches' / '--data-parallel': --micro-batches 4 x --data-parallel 2 "
            "split each mini-batch into 8 parts",
        ),
    ],
    ids=["stages", "layout", "resume", "data", "out", "micro-batches", "replicas", "both"],
)
def test_mistakes_in_the_options_are_reported_before_measuring_the_machine(
    args: list[str], code: int, message: str, tmp_path: Path, monkeypatch
) -> None:
    """A forced layout above --gpus, a missing checkpoint, missing data, an unwritable run
    folder or a mini-batch split into more parts than it has rows were reported after the first
    run's measurement of this machine's link and runtime (7 s idle, 15-17 s on a busy host,
    where every run measures again), the last as "no layout of 4 devices is feasible" after
    planning every layout."""
    import pipeoptim.cli.options as options

    def measuring(**_kwargs):
        raise AssertionError("the machine was measured before the options were checked")

    monkeypatch.setattr(options, "load_or_measure_machine_costs", measuring)
    (tmp_path / "file").write_text("")
    given = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in given else ["--out", str(tmp_path / "run")]
    result = CliRunner().invoke(cli, ["train", "fashion-mnist", "--quiet", *out, *given])
    assert result.exit_code == code, result.output
    assert message.replace("{tmp}", str(tmp_path)) in result.stderr
    assert "measured before" not in result.output


def test_a_run_folder_that_exists_but_cannot_be_written_is_named_before_measuring(
    tmp_path: Path, monkeypatch
) -> None:
    """An existing run folder without write permission passed the check (only creating it was
    tried): the run measured, planned and started its workers, then died with a PermissionError
    traceback at its first record. (The suite runs as root, whom permission bits do not stop:
    the probe file is refused here as a read-only folder refuses it. A read-only profile folder
    is used: tests/test_cli_partition.py.)"""
    import pipeoptim.cli.options as options
    import pipeoptim.fileio as fileio

    blocked = tmp_path / "readonly"
    blocked.mkdir()
    probe = fileio.tempfile.TemporaryFile

    def refused(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == blocked:
            raise PermissionError(13, "Permission denied")
        return probe(*args, dir=dir, **kwargs)

    def measuring(**_kwargs):
        raise AssertionError("the machine was measured before the folders were checked")

    monkeypatch.setattr(fileio.tempfile, "TemporaryFile", refused)
    monkeypatch.setattr(options, "load_or_measure_machine_costs", measuring)
    args = ["--out", str(blocked), "--profile-dir", str(tmp_path / "profiles")]
    result = CliRunner().invoke(cli, ["train", "digits", "--quiet", *args])
    assert result.exit_code == 1, result.output
    assert (
        f"cannot write into the run folder {blocked} (Permission denied): choose a writable --out"
        in result.stderr
    )
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_resume_given_a_checkpoint_file_without_a_suffix_reads_that_file(tmp_path: Path) -> None:
    """--resume at an existing file without a suffix was taken for a folder ("no checkpoint at
    FILE/checkpoint.pt"); it is read as the checkpoint it names."""
    saved = tmp_path / "saved"
    saved.write_text("not a checkpoint")
    code, _, err = run("digits", "--resume", str(saved), "--out", str(tmp_path / "run"))
    assert code == 1 and f"{saved} is not a checkpoint (not a file torch.save wrote)" in err, err


def test_momentum_given_to_an_optimizer_without_it_is_a_usage_error(tmp_path) -> None:
    """--momentum with --optimizer adam was ignored in silence."""
    result = CliRunner().invoke(
        cli, ["train", "digits", "--optimizer", "adam", "--momentum", "0.5", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2, result.output
    assert "--momentum applies to sgd and rmsprop, not --optimizer adam" in result.output
    assert not (tmp_path / "r").exists()


def test_a_resumed_run_keeps_the_settings_it_is_not_given_anew(tmp_path: Path) -> None:
    """helper-98: a resumed run without --checkpoint-every wrote no checkpoint, so the next
    resume went back to the first run's and trained its epochs again without a word, and
    "already has 2 epochs" contradicted metrics.json's 3. Every setting not given anew is the
    run's own (the epochs too: a resume without --epochs finishes the run it continues)."""
    out = tmp_path / "ri"
    common = ["digits", "--gpus", "2", "--stages", "2", "--method", "1f1b", "--executor", "local"]
    common += ["--limit", "64", "--out", str(out), "--profile-dir", str(tmp_path / "profiles")]
    code, _, err = run(*common, "--epochs", "2", "--checkpoint-every", "30", "--max-grad-norm", "1.0")
    assert code == 0, err
    code, _, err = run(*common, "--resume", str(out), "--epochs", "3")
    assert code == 0, err
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["checkpoint_every"], config["max_grad_norm"], config["epochs"]) == (30, 1.0, 3)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["mini_batches"] == 6  # after epoch 3
    for epochs in (["--epochs", "2"], []):
        code, _, err = run(*common, "--resume", str(out), *epochs)
        assert code == 1 and "nothing to do" in err and "already has 3 epochs" in err, err
    # a setting given anew is still checked against the run's
    code, _, err = run(*common, "--resume", str(out), "--epochs", "4", "--seed", "1")
    assert code == 1 and "made with --seed 0, this run has --seed 1" in err
    # without --out a resumed run goes on in its own folder (helper-99: "Missing option")
    code, _, err = run(
        "digits", "--resume", str(out), "--epochs", "4", "--profile-dir", str(tmp_path / "profiles")
    )
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["mini_batches"] == 8
    code, _, err = run("digits", "--gpus", "2")
    assert code == 2 and "Missing option '--out': the run folder (optional only with --resume)" in err


def test_resuming_a_checkpoint_older_than_the_runs_records_says_what_is_trained_again(
    tmp_path: Path,
) -> None:
    from pipeoptim.errors import CheckpointError
    from pipeoptim.resume import check_resume
    from pipeoptim.training import TrainConfig

    out = tmp_path / "rc"
    code, _, err = run(
        "digits", "--gpus", "2", "--stages", "2", "--method", "1f1b", "--executor", "local", "--limit", "64",
        "--epochs", "1", "--checkpoint-every", "1", "--out", str(out), "--profile-dir", str(tmp_path / "p"),
    )  # fmt: skip
    assert code == 0, err
    config = TrainConfig(**{**json.loads((out / "metrics.json").read_text())["config"], "epochs": 2})
    with pytest.raises(CheckpointError, match="made with task digits, this run has task sst2; use"):
        check_resume(replace(config, resume=str(out), task="sst2"), print)  # named --task (helper-152)
    said: list[str] = []
    assert check_resume(replace(config, resume=str(out)), said.append)[0] == out / "checkpoint.pt"
    assert said == []  # the checkpoint holds every recorded mini-batch
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({**metrics, "mini_batches": 5}))  # a later run's records
    check_resume(replace(config, resume=str(out)), said.append)
    assert said == [
        f"the checkpoint {out / 'checkpoint.pt'} holds mini-batch 2 of the 5 that {out / 'metrics.json'} "
        "records: the 3 after it are trained again (the run that made them wrote no later checkpoint)"
    ]


def test_resume_accepts_the_layout_the_planner_chose_given_explicitly(tmp_path: Path) -> None:
    """helper-99: --stages 2 on resuming a run whose planner had chosen 2 stages was refused
    ("made with no --stages"); another layout still is."""
    out = tmp_path / "rl"
    common = ["digits", "--gpus", "2", "--executor", "local", "--limit", "64", "--out", str(out)]
    common += ["--profile-dir", str(tmp_path / "profiles")]
    code, _, err = run(*common, "--epochs", "1", "--checkpoint-every", "1")
    assert code == 0, err
    chosen = json.loads((out / "metrics.json").read_text())["layout"]["stages"]
    code, _, err = run(*common, "--resume", str(out), "--epochs", "3", "--stages", str(3 - chosen))
    # the planner's choice named (helper-157: "made with no --stages" read as if it had none)
    said = f"made with no --stages (the planner chose {chosen}), this run has --stages {3 - chosen}"
    assert code == 1 and said in err, err
    code, _, err = run(*common, "--resume", str(out), "--epochs", "2", "--stages", str(chosen))
    assert code == 0, err


def test_a_run_folder_in_use_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """Two runs into one --out both wrote train.csv, each step twice, and the last to end won
    metrics.json and checkpoint.pt (helper-110). The second is refused at once and deletes
    nothing of the first's (the earlier checkpoint it would replace stays, and it does not say
    it replaces it); a killed holder leaves no lock behind."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"the first run's")
    hold = (
        "import sys, time\nfrom pipeoptim.fileio import held_folder\n"
        "with held_folder(sys.argv[1], 'run folder', '--out'):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, _, err = run("digits", "--out", str(out), "--epochs", "1", "--profile-dir", str(tmp_path / "p"))
        assert code == 1, err
        assert f"the run folder {out} is in use by another run: choose another --out, or wait until" in err
        assert "holds an earlier run" not in err  # it would replace nothing
        assert [p.name for p in out.iterdir()] == ["checkpoint.pt"]
        assert (out / "checkpoint.pt").read_bytes() == b"the first run's"
    finally:
        holder.kill()
        holder.wait()
    with held_folder(out, "run folder", "--out"):
        pass


@pytest.mark.parametrize("optimizer, decay", [("adamw", 0.01), ("adam", 0.0), ("sgd", 0.0)])
def test_weight_decay_defaults_to_the_optimizers_own(optimizer: str, decay: float) -> None:
    """helper-124: --weight-decay defaulted to 0 for every optimizer, so --optimizer adamw
    trained exactly as adam (torch's AdamW decays by 0.01); an explicit value still wins."""
    config = training.TrainConfig(task="digits", out="unused", optimizer=optimizer)
    assert config.weight_decay == decay
    made = make_optimizer(optimizer, [torch.nn.Parameter(torch.ones(2))], 0.1, 0.9, config.weight_decay)
    assert made.param_groups[0]["weight_decay"] == decay
    assert (
        training.TrainConfig(task="digits", out="unused", optimizer=optimizer, weight_decay=0.5).weight_decay
        == 0.5
    )


def test_a_run_stopped_while_an_epoch_is_evaluated_resumes_with_that_epochs_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-124: with --checkpoint-every dividing the epoch, a checkpoint was written at the
    epoch's last mini-batch, before its evaluation; stopped during the evaluation, the resumed
    run started at the next epoch without the epoch's record, and counted its losses in the
    next epoch's mean. Now the checkpoint after the evaluation is the epoch's last."""
    config = training.TrainConfig(
        task="digits",
        out=str(tmp_path / "whole"),
        gpus=2,
        executor="local",
        epochs=2,
        limit=320,
        checkpoint_every=5,  # 10 mini-batches an epoch
        lr_schedule="constant",
        progress=False,
        profile_dir=str(tmp_path / "profiles"),
    )
    whole = training.train(config, log=lambda _line: None)
    calls = []
    real = training.make_task

    def stopping(*args, **kwargs):
        task = real(*args, **kwargs)
        evaluate = task.evaluate

        def first_stops(predict):
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt
            return evaluate(predict)

        return replace(task, evaluate=first_stops)

    monkeypatch.setattr(training, "make_task", stopping)
    part = replace(config, out=str(tmp_path / "part"))
    with pytest.raises(KeyboardInterrupt):
        training.train(part, log=lambda _line: None)
    resumed = training.train(replace(part, resume=part.out), log=lambda _line: None)
    keys = ("epoch", "train_loss", "accuracy")
    assert [{k: e[k] for k in keys} for e in resumed["epochs"]] == [
        {k: e[k] for k in keys} for e in whole["epochs"]
    ]


def test_a_stopped_runs_metrics_count_the_mini_batches_that_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-124: metrics.json counted the mini-batches handed to the pipeline, those in
    flight when the run was stopped included (34 against 31 rows of train.csv)."""
    real, calls = pipeoptim.Pipeline.step, []

    def stops_at_the_eighth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pipeoptim.Pipeline, "step", stops_at_the_eighth)
    out = tmp_path / "run"
    config = training.TrainConfig(
        task="digits",
        out=str(out),
        gpus=4,
        stages=4,
        executor="processes",  # the local executor finishes every mini-batch it was given
        epochs=1,
        limit=320,
        record_every=1,
        progress=False,
        profile_dir=str(tmp_path / "profiles"),
    )
    with pytest.raises(KeyboardInterrupt):
        training.train(config, log=lambda _line: None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert metrics["mini_batches"] == len(rows(out / "train.csv"))
