"""This machine's link and runtime figures: measured once, cached, and used by `pipeoptim train`."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from pipeoptim import machine_costs
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.machine_costs import MACHINE_COSTS_FILE, MachineCosts, load_or_measure_machine_costs

from .test_train_cli import run

#: how MachineCosts(2e-4, 5e9, 6e-4, 2e9, 1e-3) is logged
FIGURES = "latency 200 us, bandwidth 5.00 GB/s, runtime overhead 0.600 ms per action, " + (
    "all-reduce 1000 us each and bandwidth 2.00 GB/s"
)


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other processes (a benchmark beside the suite) must not make these figures unsaved;
    :func:`test_a_busy_machine_is_named_after_measuring_and_not_saved` sets its share."""
    monkeypatch.setattr(machine_costs.other_work, "available", lambda: True)
    monkeypatch.setattr(machine_costs.other_work, "OtherWork", FixedShare)
    monkeypatch.setattr(FixedShare, "share_value", 0.0)
    monkeypatch.setattr(machine_costs, "_UNSAVED", {})


def counting(monkeypatch: pytest.MonkeyPatch, figures: MachineCosts) -> list[int]:
    """Make measuring return ``figures``; the list grows by one per measurement."""
    calls: list[int] = []

    def measure() -> MachineCosts:
        calls.append(1)
        return figures

    monkeypatch.setattr(machine_costs, "measure_machine_costs", measure)
    return calls


@pytest.mark.slow
def test_a_real_measurement_is_plausible_and_then_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the test session's cache (conftest): measured here, or by an earlier test's run (as
    on an idle machine: one busy with other work is not saved, the next test)."""
    first = load_or_measure_machine_costs()
    # seconds per message on one machine; 0 where noise made the free fit's α negative (a
    # loaded machine: fit_latency_bandwidth clamps it, and a suite beside another gave 0.0).
    # Under 1 ms: the median of round trips gave 0.5-1.3 ms on the project's VM, where a
    # message takes 30-60 us and a late wake-up adds 1.8 ms to some (runtime/linkcost.py)
    assert 0 <= first.latency < 1e-3
    assert 1e7 < first.bandwidth < 1e12  # bytes/s
    assert 0 < first.action_overhead < 0.05  # seconds per action
    assert 1e7 < first.allreduce_bandwidth < 1e12  # bytes/s
    assert 0 <= first.allreduce_latency < 0.1  # seconds per all-reduce (late wake-ups: ~2 ms here)
    assert (machine_costs.cache_dir() / MACHINE_COSTS_FILE).exists()
    calls = counting(monkeypatch, MachineCosts(1.0, 1.0, 1.0, 1.0, 1.0))
    assert load_or_measure_machine_costs() == first and not calls


def test_another_machine_or_torch_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting(monkeypatch, MachineCosts(2e-4, 5e9, 6e-4, 2e9, 1e-3))
    logged: list[str] = []
    assert load_or_measure_machine_costs(tmp_path, logged.append) == (2e-4, 5e9, 6e-4, 2e9, 1e-3)
    assert len(calls) == 1
    figures = FIGURES
    saved = f"saved {tmp_path / MACHINE_COSTS_FILE}: {figures}"
    assert any(line.startswith(saved) for line in logged), logged
    assert load_or_measure_machine_costs(tmp_path) == (2e-4, 5e9, 6e-4, 2e9, 1e-3) and len(calls) == 1
    monkeypatch.setattr(machine_costs.torch, "__version__", "9.9.9")
    load_or_measure_machine_costs(tmp_path)
    assert len(calls) == 2
    assert len(json.loads((tmp_path / MACHINE_COSTS_FILE).read_text())) == 2  # both kept


def test_reused_figures_are_logged_with_when_they_were_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run on cached figures said nothing of them, even while other processes used half the
    CPU: the plan's rates came from a measurement of another day without a word."""
    calls = counting(monkeypatch, MachineCosts(2e-4, 5e9, 6e-4, 2e9, 1e-3))
    load_or_measure_machine_costs(tmp_path)
    path, key = tmp_path / MACHINE_COSTS_FILE, machine_costs.machine_key()
    table = json.loads(path.read_text())
    when = datetime.datetime.fromisoformat(table[key][machine_costs.MEASURED_AT])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 60
    figures = FIGURES
    for measured_at, said in (
        ("2026-11-28T09:30:00+00:00", "measured 2026-11-28 09:30 UTC, "),
        (None, "measured earlier"),  # a cache written before the time was kept
    ):
        table[key].pop(machine_costs.MEASURED_AT, None)
        if measured_at is not None:
            table[key][machine_costs.MEASURED_AT] = measured_at
        path.write_text(json.dumps(table))
        logged: list[str] = []
        assert load_or_measure_machine_costs(tmp_path, logged.append) == (2e-4, 5e9, 6e-4, 2e9, 1e-3)
        assert len(logged) == 1 and said in logged[0], logged
        assert logged[0].startswith(f"this machine's costs from {path} (measured ")
        assert logged[0].endswith(f"; delete it to measure again): {figures}")
    assert len(calls) == 1
    assert machine_costs._age("2026-11-28T09:30:00+00:00").endswith("days ago")
    assert machine_costs._age(datetime.datetime.now(datetime.timezone.utc).isoformat()).endswith("just now")


def test_an_unreadable_cache_is_named_and_measured_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / MACHINE_COSTS_FILE).write_text("{not json")
    calls = counting(monkeypatch, MachineCosts(2e-4, 5e9, 6e-4, 2e9, 1e-3))
    logged: list[str] = []
    assert load_or_measure_machine_costs(tmp_path, logged.append) == (2e-4, 5e9, 6e-4, 2e9, 1e-3) and calls
    assert f"{tmp_path / MACHINE_COSTS_FILE} is unreadable" in logged[0]
    key = machine_costs.machine_key()
    table = json.loads((tmp_path / MACHINE_COSTS_FILE).read_text())
    saved = table[key]
    impossible = [  # figures no measurement gives; 1e308 stopped planning with a traceback
        *({"latency": v} for v in (-1.0, float("inf"), float("nan"), 1e308, "x", None)),
        *({"bandwidth": v} for v in (0.0, 0.5, 1e19, 1.0)),
        *({"action_overhead": v} for v in (1e308, 3000.0)),
        *({"allreduce_bandwidth": v} for v in (0.0, 1e19, 1.0, None)),
        *({"allreduce_latency": v} for v in (-1.0, 3000.0, None, 1)),
        {"latency": 3000.0},  # the cost model takes it: every plan priced at 0 mini-batches/s
    ]
    # a figure hand-edited, or missing (an entry of an older version): named, not cut off
    # after 120 characters of the entry, which hid the figure at fault (helper-144)
    cases = [
        ({**saved, **change}, f"{name} {json.dumps(value)}")
        for change in impossible
        for name, value in change.items()
    ]
    cases.append(({k: v for k, v in saved.items() if k != "allreduce_latency"}, "no allreduce_latency"))
    cases.append(({**saved, "jitter": 1.0}, "jitter unknown"))
    cases.append(([1, 2], "[1, 2], not a table of figures"))
    for entry, named in cases:
        table[key] = entry
        (tmp_path / MACHINE_COSTS_FILE).write_text(json.dumps(table))
        logged.clear()
        assert load_or_measure_machine_costs(tmp_path, logged.append) == (2e-4, 5e9, 6e-4, 2e9, 1e-3)
        assert logged[0] == (
            f"measuring this machine's costs again: {tmp_path / MACHINE_COSTS_FILE} holds {named}, "
            "not a figure measured on this machine"
        ), entry
    assert len(calls) == 1 + len(cases)


def test_a_cache_that_cannot_be_written_still_gives_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    calls = counting(monkeypatch, MachineCosts(2e-4, 5e9, 6e-4, 2e9, 1e-3))
    for cache in (blocker, blocker / "below"):  # a file, and a folder that cannot be made
        logged: list[str] = []
        assert load_or_measure_machine_costs(cache, logged.append) == (2e-4, 5e9, 6e-4, 2e9, 1e-3)
        assert any(
            "could not save them in" in line
            and "this process reuses them" in line
            and machine_costs.CACHE_ENV in line
            for line in logged
        )
        assert load_or_measure_machine_costs(cache) == (2e-4, 5e9, 6e-4, 2e9, 1e-3)  # not measured again
    assert len(calls) == 2
    monkeypatch.setattr(machine_costs, "_UNSAVED", {})  # a new process
    load_or_measure_machine_costs(blocker)
    assert len(calls) == 3


class FixedShare:
    """An OtherWork that reads ``share`` (the measurement's other processes)."""

    share_value = 0.0

    def share(self) -> float:
        return self.share_value


def test_a_busy_machine_is_named_after_measuring_and_not_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside a test suite a measurement fitted gloo's latency at 0 us, which, saved, priced
    every later plan: figures measured while others took over a quarter of the cores serve
    this run only."""
    calls = counting(monkeypatch, MachineCosts(2e-4, 5e9, 6e-4, 2e9, 1e-3))
    FixedShare.share_value = 0.6
    logged: list[str] = []
    assert load_or_measure_machine_costs(tmp_path, logged.append) == (2e-4, 5e9, 6e-4, 2e9, 1e-3)
    assert logged[-1] == (
        "the machine was busy while measuring (other processes used 60% of the CPU time): latency 200 us, "
        "bandwidth 5.00 GB/s, runtime overhead 0.600 ms per action, all-reduce 1000 us each "
        "and bandwidth 2.00 GB/s are used by this process only, not "
        "saved; the next run measures again"
    )
    assert not (tmp_path / MACHINE_COSTS_FILE).exists()
    assert load_or_measure_machine_costs(tmp_path) == (2e-4, 5e9, 6e-4, 2e9, 1e-3)  # this process's
    assert len(calls) == 1
    machine_costs._UNSAVED.clear()  # as a new run starts
    load_or_measure_machine_costs(tmp_path)
    assert len(calls) == 2  # measured again
    FixedShare.share_value = 0.1
    machine_costs._UNSAVED.clear()
    logged.clear()
    load_or_measure_machine_costs(tmp_path, logged.append)
    assert not any("machine was busy" in line for line in logged)
    assert logged[-1].startswith(f"saved {tmp_path / MACHINE_COSTS_FILE}")
    load_or_measure_machine_costs(tmp_path)
    assert len(calls) == 3  # idle: saved and reused


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(machine_costs.CACHE_ENV, str(tmp_path / "c"))
    assert machine_costs.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(machine_costs.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert machine_costs.cache_dir() == tmp_path / "x" / "pipeoptim"


@pytest.mark.slow
def test_train_prices_its_plan_with_this_machines_figures(tmp_path: Path) -> None:
    """By default the run's plan counts this machine's cached latency, bandwidth and runtime
    overhead (3 actions per stage and mini-batch); with the local executor they do not
    describe the stages: the plan counts none, and where 'measure' was asked for, the log
    says why."""
    common = ("digits", "--gpus", "2", "--stages", "2", "--epochs", "1", "--limit", "64")
    code, _, err = run(*common, "--out", str(tmp_path / "run"), "--profile-dir", str(tmp_path / "p"))
    assert code == 0, err
    figures = load_or_measure_machine_costs()  # the session's cache: what the run used
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    epoch, predicted = metrics["epochs"][0], metrics["plan"]["throughput_per_s"]
    assert epoch["of_plan"] == pytest.approx(epoch["mini_batches_per_s"] / predicted)
    assert f"({epoch['of_plan']:.2f} of the plan's {predicted:.3g}" in err
    assert epoch["other_cpu"] is None or 0.0 <= epoch["other_cpu"] <= 1.0
    stages = metrics["stages"]
    assert [s["overhead_s"] for s in stages] == pytest.approx([3 * figures.action_overhead] * 2)
    assert all(s["comm_s"] > 0 for s in stages)
    local = (*common, "--executor", "local", "--profile-dir", str(tmp_path / "p"))
    code, _, err = run(*local, "--out", str(tmp_path / "local"))
    assert code == 0, err
    assert "not measuring" not in err  # the documented default
    stages = json.loads((tmp_path / "local" / "metrics.json").read_text())["stages"]
    assert [s["overhead_s"] for s in stages] == [0, 0]
    code, _, err = run(*local, "--latency", "measure", "--out", str(tmp_path / "asked"))
    assert code == 0, err
    assert "not measuring --latency: --executor local runs the stages in this process" in err


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e308"])
def test_a_cost_model_refuses_impossible_seconds(value: str) -> None:
    for name in ("latency_s", "action_overhead_s", "step_s_per_byte"):
        with pytest.raises(ValueError, match=f"{name} must be a number of seconds from 0 to 3600"):
            CostConfig(num_stages=2, **{name: float(value)})


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e-300", "0.5", "1e19"])
def test_a_cost_model_refuses_bandwidths_that_overflow_its_times(value: str) -> None:
    for name in ("bandwidth", "allreduce_bandwidth"):
        with pytest.raises(ValueError, match=rf"{name} must be None \(free\) or 1 to 1e\+18 bytes/s"):
            CostConfig(num_stages=2, **{name: float(value)})
    assert CostConfig(num_stages=2, bandwidth=1.0, allreduce_bandwidth=None).bandwidth == 1.0


@pytest.mark.parametrize(
    "measured_at, said",
    [
        ("0001-01-01T00:00:00+23:59", "at an unreadable time"),  # OverflowError in the subtraction
        ("9999-12-31T23:59:00-23:59", "at an unreadable time"),
        ("2999-01-01T00:00:00+00:00", "2999-01-01 00:00 UTC, in the future"),  # read "just now"
    ],
)
def test_a_cache_time_out_of_range_is_named_not_a_traceback(measured_at: str, said: str) -> None:
    assert machine_costs._age(measured_at) == said


def test_figures_measured_with_the_ranks_unbound_are_not_reused_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting(monkeypatch, MachineCosts(2e-4, 5e9, 6e-4, 2e9, 1e-3))
    monkeypatch.setenv("PIPEOPTIM_CPU_AFFINITY", "off")
    load_or_measure_machine_costs(tmp_path)
    monkeypatch.delenv("PIPEOPTIM_CPU_AFFINITY")
    load_or_measure_machine_costs(tmp_path)
    expected = 2 if machine_costs.binding_wanted() else 1  # a process held to some cores never binds
    assert len(calls) == expected and len(json.loads((tmp_path / MACHINE_COSTS_FILE).read_text())) == expected
