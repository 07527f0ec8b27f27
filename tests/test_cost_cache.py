"""The caches of measured costs (update-costs.json, machine-costs.json): written under a lock,
keyed by what changes the work, and a folder that takes no file is said, not raised
(helper-115)."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import torch

from pipeoptim.compiler.profile_cache import load_or_profile
from pipeoptim.compiler.trace import trace
from pipeoptim.examples import mlp
from pipeoptim.fileio import update_json_table
from pipeoptim.update_cost_cache import load_or_measure_update_cost


def _write_many(path: str, prefix: str, count: int) -> None:
    for i in range(count):
        update_json_table(Path(path), f"{prefix}{i}", [i])


def test_two_processes_writing_one_cache_keep_every_entry(tmp_path: Path) -> None:
    """Each read the table, measured, then wrote it back whole: the other's entry written in
    between was lost."""
    path = tmp_path / "update-costs.json"
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_many, args=(str(path), p, 40)) for p in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
        assert w.exitcode == 0
    table = json.loads(path.read_text())
    assert sorted(table) == sorted(f"{p}{i}" for p in ("a", "b") for i in range(40))


def test_a_new_learning_rate_reuses_the_timed_step(tmp_path: Path) -> None:
    """Its value does not change the step's kernels; momentum on or off does."""
    first = load_or_measure_update_cost(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, profile_dir=tmp_path)
    for lr, momentum in ((0.01, 0.9), (torch.tensor(0.01), 0.9), (0.3, 0.5)):
        load_or_measure_update_cost(torch.optim.SGD, {"lr": lr, "momentum": momentum}, profile_dir=tmp_path)
    again = load_or_measure_update_cost(torch.optim.SGD, {"lr": 0.5, "momentum": 0.5}, profile_dir=tmp_path)
    assert again == first
    table = json.loads((tmp_path / "update-costs.json").read_text())
    assert len(table) == 2  # a tensor learning rate runs other code: timed apart
    load_or_measure_update_cost(torch.optim.SGD, {"lr": 0.5, "momentum": 0.0}, profile_dir=tmp_path)
    assert len(json.loads((tmp_path / "update-costs.json").read_text())) == 3


def test_a_folder_that_takes_no_file_is_said_not_raised(tmp_path: Path) -> None:
    """compile(profile_dir=<read-only folder>) raised OSError on the cache's temporary file,
    naming neither the folder's role nor the fix (here a file where the folder should be:
    root writes into read-only folders)."""
    folder = tmp_path / "profiles"
    folder.write_text("not a folder")
    logs: list[str] = []
    costs = load_or_measure_update_cost(torch.optim.SGD, {"lr": 0.1}, profile_dir=folder, log=logs.append)
    assert costs[0] > 0 and folder.read_text() == "not a folder"
    assert len(logs) == 1 and "could not save them in" in logs[0] and "profile_dir=None" in logs[0]


def test_a_profile_that_cannot_be_saved_is_used_and_said(tmp_path: Path) -> None:
    folder = tmp_path / "profiles"
    folder.write_text("not a folder")
    model, inputs = mlp(batch=4, width=16, depth=2)
    logs: list[str] = []
    graph, reused = load_or_profile(trace(model, inputs), inputs, profile_dir=folder, log=logs.append)
    assert not reused and len(graph.nodes) > 4
    assert "could not save the profile in" in logs[-1] and "this run uses it" in logs[-1]


def test_another_users_lock_file_still_locks(tmp_path: Path, monkeypatch) -> None:
    """The lock file of another user (0644) was opened to write, refused, and the table then
    written unlocked without a word (helper-117); flock needs a descriptor to read only. (The
    suite runs as root, whom permission bits do not stop: the refusal is simulated.)"""
    import pipeoptim.fileio as fileio

    path = tmp_path / "update-costs.json"
    lock = tmp_path / "update-costs.json.lock"
    lock.write_text("")
    opened, locked = [], []
    real_open, real_flock = os.open, fileio.fcntl.flock

    def as_another_users(file, flags, *args):
        if Path(file) == lock and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied")
        fd = real_open(file, flags, *args)
        opened.append((Path(file), fd))
        return fd

    monkeypatch.setattr(fileio.os, "open", as_another_users)
    monkeypatch.setattr(fileio.fcntl, "flock", lambda fd, op: locked.append(fd) or real_flock(fd, op))
    update_json_table(path, "a", [1])
    assert json.loads(path.read_text()) == {"a": [1]}
    (held,) = [fd for file, fd in opened if file == lock]
    assert held in locked
