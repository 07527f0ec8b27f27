"""Smoke test: every benchmark's --quick mode runs and writes its results (no speed assertions)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(
    script: str, argv: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``benchmarks/<script> argv`` run as a user runs it, from ``cwd`` (``env``: variables to
    set); its exit and output."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, files",
    [
        ("partition.py", ["partition.md", "partition_solve_time.png"]),
        ("throughput.py", ["throughput.md", "throughput_timeline.png", "throughput_memory.png"]),
        ("convergence.py", ["convergence.md", "convergence_digits_sgd.png"]),
        ("long_run.py", ["long_run.md"]),
        ("memory.py", ["memory.md"]),
        (
            "staleness.py",
            [
                "staleness.md",
                "staleness_metric.png",
                "staleness_loss_N4.png",  # the quick study's deepest pipeline
                "staleness_prediction_error.png",
            ],
        ),
        ("affinity.py", ["affinity.md"]),
        ("memory_sharing.py", ["memory_sharing.md"]),
        ("prediction_error.py", ["prediction_error.md"]),
        ("loss_pricing.py", ["loss_pricing.md"]),
    ],
)
def test_quick_benchmark_runs(tmp_path: Path, script: str, files: list[str]) -> None:
    done = _benchmark(script, ["--quick", "--out", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in files:
        assert (tmp_path / name).stat().st_size > 0, name
    summary = done.stdout.strip().splitlines()[-1]
    assert "x" in summary or "pipeoptim" in summary  # the one summary line of ratios


def test_throughput_ratios_pair_the_runs_of_one_round() -> None:
    """The host ran twice as fast in round 2 (both of its runs) and changed speed between the
    two runs of round 3: the paired ratio keeps the 0.9 of rounds 1 and 2, where the ratio of
    the median rates would be 13.5 / 12 = 1.125. Runs of one job pair window by window: the
    host halved its speed in the second of three turns and stalled in one method's third
    window; the round's ratio is the median of the windows' ratios, 0.9. Runs of two jobs
    pair their rates."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from throughput import round_ratios
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def runs(rates: list[float], windows: list | None = None, job: tuple | None = None) -> dict:
        return {"rates": rates, "round_windows": [(job, windows)] * len(rates)}

    assert round_ratios(runs([9.0, 18.0, 13.5]), runs([10.0, 20.0, 12.0])) == pytest.approx([0.9, 0.9, 1.125])
    assert round_ratios(runs([9.0, float("nan"), 9.0]), runs([10.0, 10.0, 10.0])) == pytest.approx([0.9, 0.9])
    assert round_ratios(runs([float("nan")]), runs([1.0])) == []
    job = ("pipeoptim", "pipedream")
    ours = runs([9.0], [9.0, 4.5, 4.0], job)  # its third window ran while the host stalled
    theirs = runs([10.0], [10.0, 5.0, 10.0], job)
    assert round_ratios(ours, theirs) == pytest.approx([0.9])
    assert round_ratios(ours, runs([10.0], [10.0, 5.0, 10.0], ("pipeoptim",))) == pytest.approx([0.9])


def test_throughput_verdicts_give_the_spread_of_rounds() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from throughput import verdict
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert (
        verdict([0.90, 0.97, 0.93], 0.95)
        == "0.930 (rounds 0.90-0.97; misses >= 0.95, within the spread of rounds)"
    )
    assert verdict([0.80, 0.84, 0.83], 0.95) == "0.830 (rounds 0.80-0.84; misses >= 0.95)"
    assert verdict([0.96, 1.01, 0.99], 0.95) == "0.990 (rounds 0.96-1.01; meets >= 0.95)"
    assert (
        verdict([0.94, 1.01, 0.99], 0.95)
        == "0.990 (rounds 0.94-1.01; meets >= 0.95, within the spread of rounds)"
    )
    assert verdict([1.4], None) == "1.400 (1 round)"
    assert verdict([], 0.9) == "nan"


def test_throughput_prices_a_plan_as_the_planner_did(tmp_path: Path) -> None:
    """Re-priced from the profile and optimizer costs the plan was made from, a run's
    prediction is the plan's own (same stages, settings and recomputation)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    costs = {"bandwidth": 2e9, "latency": 1e-4, "action_overhead": 3e-4}
    with throughput.compile_model("mlp", "pipeoptim", 3, "local", tmp_path, 64, **costs) as pipe:
        plan = pipe.plan
    config = plan.config
    priced = throughput.priced_now("mlp", {"pipeoptim": plan}, tmp_path, lambda same: same)["pipeoptim"]
    assert priced["throughput_per_s"] == pytest.approx(plan.summary["throughput_per_s"], rel=1e-12)
    assert priced["bubble_fraction"] == pytest.approx(plan.summary["bubble_fraction"], rel=1e-12)
    assert config.action_overhead_s == 3e-4 and config.latency_s == 1e-4


def _outputs(*names: str) -> tuple:
    """``names`` of ``benchmarks/outputs.py`` (imported from there, as the scripts do)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import outputs
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return tuple(getattr(outputs, name) for name in names)


def test_only_a_full_run_writes_the_committed_results(tmp_path: Path, monkeypatch) -> None:
    """--quick, or any option that measures a part (stage counts, methods), goes to a new
    temporary folder; --out wins; the full run writes benchmarks/results."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))
    (tmp_path / "temporary").mkdir()
    RESULTS, results_dir, run_kind = _outputs("RESULTS", "results_dir", "run_kind")

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--out")
    scope = ("stages", "methods")

    def where(*argv: str) -> Path:
        return results_dir(parser, parser.parse_args(list(argv)), "bench", scope)

    assert where() == RESULTS == ROOT / "benchmarks" / "results"
    for partial in (["--quick"], ["--stages", "2"], ["--methods", "pipeoptim"]):
        folder = where(*partial)
        assert (
            folder.parent == tmp_path / "temporary" and folder.is_dir() and folder.name.startswith("bench-")
        )
    assert where("--quick", "--out", str(tmp_path)) == tmp_path
    assert where("--stages", "4") == RESULTS  # the default given explicitly is the full run
    # a partial run was titled "full run"

    kinds = [run_kind(parser, parser.parse_args(a), scope) for a in ([], ["--quick"], ["--stages", "3"])]
    assert kinds == ["full", "quick", "partial"]
    # a full run lacking data it needs (../shared absent) is a partial run: it replaced the
    # committed staleness study with "0 cells" (helper-137)
    args = parser.parse_args([])
    folder = results_dir(parser, args, "bench", scope, needs=lambda: ["the sst2 data"])
    assert folder.parent == tmp_path / "temporary" and args.left_out == ["the sst2 data"]
    assert run_kind(parser, args, scope) == "partial"
    assert results_dir(parser, parser.parse_args([]), "bench", scope, needs=list) == RESULTS
    for argv in (
        [],
        ["--quick"],
        ["--stages", "2"],
    ):  # said to keep them, then wrote over them (helper-139, 142)
        with pytest.raises(SystemExit):
            results_dir(
                parser, parser.parse_args([*argv, "--out", str(RESULTS)]), "bench", scope, needs=lambda: ["x"]
            )
    assert (
        results_dir(parser, parser.parse_args(["--out", str(RESULTS)]), "bench", scope, needs=list) == RESULTS
    )


def test_an_option_at_the_full_runs_value_is_the_full_run(tmp_path: Path, monkeypatch) -> None:
    """Options whose default is ``None`` because ``--quick`` changes them (``--seeds``,
    ``--methods``): their full-run value given explicitly was refused as a partial run
    (``convergence.py --seeds 3 --out benchmarks/results``, helper-152); lists as sets."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    names = ("RESULTS", "positive_int", "positive_seconds", "results_dir", "run_kind")
    RESULTS, positive_int, positive_seconds, results_dir, run_kind = _outputs(*names)

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=positive_int)
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--limit", type=positive_seconds)
    parser.add_argument("--out")
    scope = {"seeds": 3, "methods": ["a", "b"], "limit": 10.0}
    kinds = {
        tuple(argv): run_kind(parser, parser.parse_args(argv), scope)
        for argv in (
            [], ["--seeds", "3"], ["--methods", "b", "a"], ["--seeds", "2"], ["--methods", "a"],
            ["--methods", "a", "b", "b"],  # a repeat measures b twice (passed as a set, helper-154)
        )
    }  # fmt: skip
    assert list(kinds.values()) == ["full", "full", "full", "partial", "partial", "partial"], kinds
    assert (
        results_dir(parser, parser.parse_args(["--seeds", "3", "--out", str(RESULTS)]), "b", scope) == RESULTS
    )
    for bad in (["--seeds", "0"], ["--seeds", "-1"], ["--seeds", "x"], ["--limit", "0"], ["--limit", "nan"]):
        with pytest.raises(SystemExit):  # argparse's usage error, exit 2
            parser.parse_args(bad)


def test_a_full_run_without_the_shared_data_leaves_the_committed_results(tmp_path: Path) -> None:
    """``partition.py --stage-times`` with ../shared absent replaced partition_16_stages.md with
    "skipped" (helper-137); now it is a partial run, written to a temporary folder."""
    committed = (ROOT / "benchmarks" / "results" / "partition_16_stages.md").read_text()
    env = {**os.environ, "PIPEOPTIM_SHARED": str(tmp_path / "absent"), "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "partition.py"), "--stage-times"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "it is a partial run; the committed results" in done.stderr
    written = list(tmp_path.glob("partition-*/partition_16_stages.md"))
    assert len(written) == 1 and "skipped" in written[0].read_text()
    assert (ROOT / "benchmarks" / "results" / "partition_16_stages.md").read_text() == committed


def test_results_name_the_host_they_were_measured_on(tmp_path: Path, monkeypatch) -> None:
    """A result's title names the CPU model from /proc/cpuinfo's first ``model name`` (an ARM
    board's ``Hardware``; undecodable bytes and lines without a value do not stop it), the
    cores and torch's version; without that file, what :mod:`platform` knows."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from outputs import host
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import os
    import platform

    import torch

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nprocessor\t: 1\nmodel name\t: other\n")
    assert host(cpuinfo) == f"AMD EPYC 9B14, {os.cpu_count()} cores, torch {torch.__version__}"
    cpuinfo.write_bytes(b"model name\nprocessor\t: 0\nCPU part\t: 0xd08\nHardware\t: BCM2835\xff\n")
    assert host(cpuinfo).startswith("BCM2835\ufffd, ")  # an ARM board; a line without a value
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert host(tmp_path / "absent") == f"arm, {os.cpu_count()} cores, torch {torch.__version__}"


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("throughput.py", ["--stages", "0"], "0: a pipeline needs at least 2 stages"),
        ("throughput.py", ["--stages", "-2", "--quick"], "-2: a pipeline needs at least 2 stages"),
        ("throughput.py", ["--rounds", "0"], "argument --rounds: 0: must be at least 1"),
        ("throughput.py", ["--stages", "9", "--models", "transformer"], "mini-batch of 8 rows"),
        ("breakdown.py", ["--stages", "1"], "1: a pipeline needs at least 2 stages"),
        ("breakdown.py", ["--clock", "gpu"], "invalid choice: 'gpu'"),
        ("affinity.py", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
        ("memory_sharing.py", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
        ("prediction_error.py", ["--seeds", "0"], "--seeds must be at least 1, got 0"),
        # nonsense with exit 0 (a negative rate, "0 cells"), hours of work queued, or a
        # traceback after the work (helper-152)
        ("long_run.py", ["--steps", "-5"], "argument --steps: -5: must be at least 1"),
        ("long_run.py", ["--stages", "0"], "a pipeline needs at least 2 stages"),
        ("convergence.py", ["--quick", "--seeds", "-1"], "argument --seeds: -1: must be at least 1"),
        ("convergence.py", ["--quick", "--work", "/dev/null/x"], "cannot make the --work folder"),
        ("staleness.py", ["--quick", "--long"], "--quick makes the study seconds: pick one"),
        ("staleness.py", ["--budget", "0"], "must be a number of seconds above 0"),
        ("staleness.py", ["--quick", "--work", "/dev/null"], "--work folder /dev/null"),
        ("partition.py", ["--quick", "--time-limit", "-1"], "must be a number of seconds above 0"),
        ("breakdown.py", ["--quick", "--model", "transformer", "--stages", "16"], "cannot be split into"),
    ],
)
def test_benchmark_options_out_of_range_are_refused(
    tmp_path: Path, script: str, argv: list[str], message: str
) -> None:
    """--stages 0 ended in a traceback after gloo was measured, --stages -2 ran, and --rounds 0
    ran the default 5 rounds; each is now a usage error (exit 2) before anything runs."""
    done = _benchmark(script, argv, tmp_path, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("script", ["prediction_error.py", "throughput.py", "memory.py"])
def test_a_results_folder_that_cannot_be_made_is_refused_before_the_work(tmp_path: Path, script: str) -> None:
    """--out naming a file: prediction_error.py trained every setting, printed its table, then
    ended in a mkdir traceback and wrote nothing."""
    (tmp_path / "file").write_text("")
    done = _benchmark(script, ["--quick", "--out", str(tmp_path / "file" / "results")], tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot make the results folder {tmp_path / 'file' / 'results'} (Not a directory)" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("script", ["throughput.py", "breakdown.py", "long_run.py", "layouts.py"])
def test_a_benchmark_refuses_an_affinity_setting_it_cannot_read(tmp_path: Path, script: str) -> None:
    """PIPEOPTIM_CPU_AFFINITY=bogus: every rank printed its traceback and breakdown.py ended in
    a RuntimeError; now a usage error naming the variable and its values, before anything runs."""
    done = _benchmark(script, ["--quick"], tmp_path, timeout=120, env={"PIPEOPTIM_CPU_AFFINITY": "bogus"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "PIPEOPTIM_CPU_AFFINITY='bogus' is neither on nor off" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


def test_throughput_summary_names_the_model_its_figures_are_from() -> None:
    """The summary line said "mlp, 4 stages" with the transformer's rate and ratios (the last
    model measured), and its weight memory, always measured on the MLP, under the run's stage
    count."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from throughput import mini_batch_rows, summary_line
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    solo = [(None, None)] * 3  # runs of their own (no windows side by side in one job)
    results = {
        "pipeoptim": {"rate": 10.79, "rates": [10.0, 12.0, 9.0], "round_windows": solo},
        "pipedream": {"rates": [10.0, 12.0, 10.0], "round_windows": solo},
        "pipelining Schedule1F1B": {"rates": [5.0, 6.0, 6.0], "round_windows": solo},
    }
    line = summary_line("transformer", 4, results, {"pipeoptim": 7, "pipedream": 10}, 4, 1e-4, 1 / 3.5e9)
    assert line == (
        "transformer, 4 stages: pipeoptim 10.79 mini-batches/s = 2.00x pipelining 1F1B, "
        "1.00x pipedream, weight memory pipeoptim/pipedream (mlp, 4 stages) 0.70x; gloo alpha "
        "100 us, bandwidth 3.50 GB/s"
    )
    # torch.distributed.pipelining needs micro-batches of equal rows: 64 rows at 3 stages is 63
    assert [mini_batch_rows("mlp", n) for n in (2, 3, 4)] == [64, 63, 64]
    assert [mini_batch_rows("transformer", n) for n in (2, 3, 4)] == [8, 6, 8]


@pytest.mark.slow
def test_torch_schedules_run_where_the_stages_do_not_divide_the_mini_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 3 stages every torch.distributed.pipelining baseline failed (64 rows split 22/21/21:
    "Expected input batch_size (22) to match target batch_size (21)") and its ratios were nan."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the spawned ranks import it too
    import throughput

    costs = {"bandwidth": 3e9, "latency": 1e-4, "action_overhead": 3e-4}
    result = throughput.run_torch_schedule("mlp", "Schedule1F1B", 3, 3, 1, 4, 1, tmp_path, costs)
    assert result["rate"] > 0  # a number: NaN is what a failed schedule reported


def test_throughput_runs_the_partners_of_each_ratio_side_by_side() -> None:
    """PipeOptim and SpecTrain run next to weight stashing and our 1F1B next to torch's in
    every round (the host drifts over minutes); the blocks rotate, and partners swap turns."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from throughput import round_order
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    names = ["pipeoptim", "pipedream", "1f1b", "none", "spectrain", "pipelining Schedule1F1B"]
    assert round_order(names, 0) == [
        "pipeoptim", "pipedream", "spectrain", "1f1b", "pipelining Schedule1F1B", "none",
    ]  # fmt: skip
    assert round_order(names, 1) == [
        "pipelining Schedule1F1B", "1f1b", "none", "spectrain", "pipedream", "pipeoptim",
    ]  # fmt: skip
    for r in range(6):
        order = round_order(names, r)
        assert sorted(order) == sorted(names)
        for a, b in [
            ("pipeoptim", "pipedream"),
            ("spectrain", "pipedream"),
            ("1f1b", "pipelining Schedule1F1B"),
        ]:
            assert abs(order.index(a) - order.index(b)) == 1, (r, order)
    firsts = {
        round_order(names, r).index("pipeoptim") < round_order(names, r).index("pipedream") for r in range(2)
    }
    assert firsts == {True, False}


@pytest.mark.parametrize("launch", ["torchrun", "processes"])
def test_throughput_runs_methods_window_by_window_in_one_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launch: str
) -> None:
    """Two methods run in one job, launched as torchrun launches it or from this process: each
    stage of each method steps once per timed mini-batch inside its windows (3 windows of 3),
    the windows of the two take turns, and each prediction lies between the ones priced
    before and after the run."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the spawned ranks import it too
    import throughput

    costs = {"bandwidth": 3e9, "latency": 1e-4, "action_overhead": 3e-4}
    methods = ["pipeoptim", "pipedream"]
    results = throughput.run_pipeoptim("mlp", methods, 2, 2, 2, 9, tmp_path, costs, 3, launch=launch)
    assert list(results) == methods
    for result in results.values():
        steps = [
            sum(op == "S" and any(s <= t0 <= e for s, e in windows) for op, _, t0, _ in acts)
            for acts, windows in zip(result["timeline"], result["spans"])
        ]
        assert steps == [9, 9]
        assert len(result["window_rates"]) == 3 and all(rate > 0 for rate in result["window_rates"])
        assert 0 <= result["bubble"] < 1
        low, high = sorted(result["predicted_before_after"])
        assert low <= result["predicted"] <= high
    ours, theirs = (results[m]["spans"][0] for m in methods)
    starts = sorted((start, m) for m, spans in zip(methods, (ours, theirs)) for start, _ in spans)
    assert [m for _, m in starts] == [
        "pipeoptim",
        "pipedream",
        "pipedream",
        "pipeoptim",
        "pipeoptim",
        "pipedream",
    ]


@pytest.mark.slow
def test_throughput_runs_torchs_schedule_in_the_job_of_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our 1F1B and torch's Schedule1F1B (with the user's SGD and with a fused one) over the
    same stages in one job: each steps once per timed mini-batch inside its own windows
    (3 windows of 3, a barrier between windows), the three take turns in the rotated order,
    and all three results carry the job's number, so that their ratios pair window by window."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the spawned ranks import it too
    import throughput

    costs = {"bandwidth": 3e9, "latency": 1e-4, "action_overhead": 3e-4}
    results = throughput.run_pipeoptim(
        "mlp", ["1f1b"], 2, 2, 1, 9, tmp_path, costs, 3, partner="Schedule1F1B"
    )
    names = ["1f1b", "pipelining Schedule1F1B", "pipelining Schedule1F1B, fused SGD"]
    assert list(results) == names
    assert len({results[name]["job"] for name in names}) == 1
    for name in names:
        result = results[name]
        steps = [
            sum(op == "S" and any(s <= t0 <= e for s, e in windows) for op, _, t0, _ in acts)
            for acts, windows in zip(result["timeline"], result["spans"])
        ]
        assert steps == [9, 9], name
        assert len(result["window_rates"]) == 3 and all(rate > 0 for rate in result["window_rates"])
    starts = sorted((start, name) for name in names for start, _ in results[name]["spans"][0])
    assert [name for _, name in starts] == names + names[1:] + names[:1] + names[2:] + names[:2]


def test_torch_stages_send_contiguous_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan cutting the LM inside attention gave stage 0 a strided (4, 4, 32, 64) output;
    torch.distributed.pipelining sized its gradient buffer like it and gloo refused it ("input
    tensor has to be contiguous"), which stopped the full benchmark run."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from throughput import _TensorStage

    class Heads(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
            return x.view(4, 32, 4, 64).transpose(1, 2), 7

    x = torch.randn(4, 32, 256)
    for split in (False, True):
        out, placeholder = _TensorStage(Heads(), {}, last=False, split_backward=split)(x)
        assert out.is_contiguous() and out.shape == (4, 4, 32, 64)
        assert torch.equal(out, x.view(4, 32, 4, 64).transpose(1, 2)) and placeholder.shape == ()


def test_throughput_windows_leave_out_fill_and_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage's idle share counts from its first optimizer step to its last forward of each
    window: the drain's wait for the last gradients (here 15 s) is not steady-state idle
    time. A window with one step has no rate (NaN), and the other windows keep their places."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from throughput import window_measures

    acts = [("F", 0, 0, 10), ("B", 0, 10, 20), ("S", 0, 20, 22), ("F", 1, 30, 40), ("B", 1, 40, 50)]
    acts += [("S", 1, 50, 52), ("F", 2, 60, 70), ("B", 2, 85, 95), ("S", 2, 95, 97)]
    acts += [("F", 3, 200, 210), ("B", 3, 210, 220), ("S", 3, 220, 222)]  # a second window
    rates, bubble = window_measures([acts], [[(0, 100), (200, 230)]], 1)
    assert rates[0] == pytest.approx(2 / 75) and rates[1] != rates[1]  # NaN
    assert bubble == pytest.approx(1 - 22 / 38)  # F1, B1 and S1 busy from 22 to 60


def test_throughput_table_shows_the_slower_middle_run_of_an_even_count() -> None:
    """With 2 rounds the table showed the faster run as "the run of median rate"."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from throughput import measure_rounds
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rates = iter([26.5, 31.2])
    chosen = measure_rounds({"pipeoptim": lambda: {"pipeoptim": {"rate": next(rates)}}}, 2, "test")
    assert chosen["pipeoptim"]["rate"] == 26.5 and chosen["pipeoptim"]["rates"] == [26.5, 31.2]


def test_throughput_rounds_record_a_failed_job_and_go_on() -> None:
    """A 4-round run lost 50 minutes of results when one job failed inside torch's
    Schedule1F1B: a failed job is recorded (rate nan, its error) for every configuration of that
    job, and the other configurations and rounds still run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from throughput import measure_rounds
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    calls = iter([RuntimeError("rank 1 exited with code 1"), 10.0])

    def ours_and_torchs() -> dict[str, dict[str, float]]:
        got = next(calls)
        if isinstance(got, Exception):
            raise got
        return {"1f1b": {"rate": got}, "pipelining Schedule1F1B": {"rate": got + 1}}

    runs = {"1f1b": ours_and_torchs, "pipelining Schedule1F1B": ours_and_torchs}
    runs["pipeoptim"] = lambda: {"pipeoptim": {"rate": 5.0}}
    chosen = measure_rounds(runs, 2, "test")
    assert chosen["pipeoptim"]["rates"] == [5.0, 5.0]
    for name, rate in (("1f1b", 10.0), ("pipelining Schedule1F1B", 11.0)):
        first, second = chosen[name]["rates"]
        assert first != first and second == rate  # nan in the failed round only
        assert chosen[name]["errors"] == ["round 1: rank 1 exited with code 1"]
    assert chosen["pipeoptim"]["errors"] == []


def test_breakdown_on_the_cpu_clock(tmp_path: Path) -> None:
    """``--clock cpu`` times each part in CPU time of the stage's thread: the report says so,
    and a blocking wait for a neighbour's values, which takes wall time but hardly any CPU,
    stays below each stage's forward compute. (The breakdown's quick smoke run: the wall
    clock differs only in the timer it passes.)"""
    done = _benchmark("breakdown.py", ["--quick", "--clock", "cpu", "--out", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("weight policy ms per mini-batch, all stages: pipeoptim "), summary
    text = (tmp_path / "breakdown.md").read_text()
    assert "milliseconds per mini-batch of CPU time of the stage's thread" in text
    header, _, *rows = [line.split("|")[1:-1] for line in text.split("\n\n")[2].splitlines()]
    columns = [c.strip() for c in header]
    forward, wait = columns.index("forward ms"), columns.index("recv wait ms")
    assert len(rows) == 4  # pipeoptim and pipedream, 2 stages each
    assert all(float(row[wait]) < float(row[forward]) for row in rows), text


def test_quick_memory_sharing_takes_the_rounds_given(tmp_path: Path) -> None:
    """``--quick --rounds 2`` ran one round (--quick overrode the rounds given; helper-154)."""
    done = _benchmark(
        "memory_sharing.py", ["--quick", "--rounds", "2", "--out", str(tmp_path / "r")], tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 round(s) of 0.25 s per run" in (tmp_path / "r" / "memory_sharing.md").read_text()
