"""Prediction error ‖W_fwd − W_bwd‖ / ‖W_bwd‖ (pipe.stats()): exact values where they are known."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.runtime.staleness import PredictionError, PredictionErrorMeter
from pipeoptim.runtime.weight_copies import CopyPool, squared_distances
from tests.given_plans import Biases, biases_plan


def run_biases(method: str, stages: int, steps: int, executor: str = "local", every: int = 1, **options):
    model = Biases()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pipeoptim.compile(
        model,
        opt,
        stages,
        example_inputs=torch.randn(6, 4),
        loss_fn=lambda out, _y: out.sum(),
        method=method,
        executor=executor,
        plan=biases_plan(method, stages),
        prediction_error_every=every,
        **options,
    ) as pipe:
        for t in range(steps):
            pipe.step(torch.full((6, 4), float(t)), None)
        pipe.flush()
        if executor == "local":
            pools.extend(stage.prediction_error._pool._free for stage in pipe._executor.stages)
        return pipe.stats()


#: the copy pools of the stages of the last run_biases runs (local executor)
pools: list[list] = []


def expected_staleness(stages: int, stage: int, steps: int) -> float:
    """Plain SGD from W(0) = 0 with a constant gradient g: W(t) = −t·lr·g, so mini-batch t's
    forward at version t − s and its backward at version t are ‖s·lr·g‖ / ‖t·lr·g‖ = s / t
    apart, s = min(t, N − k − 1) (0 at t = 0, where both are zero)."""
    total = 0.0
    for t in range(1, steps):
        total += min(t, stages - stage - 1) / t
    return total / steps


@pytest.mark.parametrize("stages", [2, 3])
def test_no_correction_error_is_the_closed_form_staleness(stages: int) -> None:
    stats = run_biases("none", stages, 12)
    assert stats.prediction_error_samples == [12] * stages
    for k in range(stages):
        assert stats.prediction_error[k] == pytest.approx(expected_staleness(stages, k, 12), abs=1e-6)
    assert stats.prediction_error[-1] == 0.0
    assert stats.staleness == stats.prediction_error  # the forward uses the current weights


def test_pipedream_measures_the_same_staleness_as_no_correction() -> None:
    """The stash hides W(t−s) − W(t) from the backward, not from the update (applied to W(t));
    with constant gradients the two methods follow the same trajectory."""
    pipedream, none = run_biases("pipedream", 3, 12), run_biases("none", 3, 12)
    assert pipedream.prediction_error == pytest.approx(none.prediction_error, abs=1e-9)
    assert pipedream.prediction_error[0] > 0.3


def test_pipeoptim_error_vanishes_once_it_has_a_gradient_to_predict_from() -> None:
    """Constant gradients, plain SGD: Ŵ = W − s·lr·g is exact from the first step on; only the
    forwards before stage k's first step (Ŵ = W then) are off, by s/t."""
    stats = run_biases("pipeoptim", 3, 12)
    # stage 0 (s = 2): t = 1 and t = 2 forward before its first step: errors 1/1 and 2/2
    assert stats.prediction_error[0] == pytest.approx(2 / 12, abs=1e-6)
    # stage 1 (s = 1): only t = 1
    assert stats.prediction_error[1] == pytest.approx(1 / 12, abs=1e-6)
    assert stats.prediction_error[2] == 0.0
    # on the same trajectory, the weights current at the forward were as stale as no correction's
    for k in range(3):
        assert stats.staleness[k] == pytest.approx(expected_staleness(3, k, 12), abs=1e-6)


def test_weights_the_policy_keeps_are_read_not_copied(monkeypatch) -> None:
    """Weight stashing keeps the forward's weights until the backward, and so does PipeOptim
    with backward='predicted' (its Ŵ): the meter reads them there instead of copying them at
    the forward, and measures the same closed-form values as the copying path (no correction,
    PipeOptim with the current weights in its backward)."""
    copied: list[int] = []
    original = CopyPool.copy
    monkeypatch.setattr(CopyPool, "copy", lambda self, ts: copied.append(len(ts)) or original(self, ts))
    pipedream = run_biases("pipedream", 3, 12)
    assert not copied  # every weight it compared was the stash's (or W, unchanged)
    assert pipedream.prediction_error == pytest.approx(run_biases("none", 3, 12).prediction_error, abs=1e-9)
    copied.clear()
    consistent = run_biases("pipeoptim", 3, 12, backward="predicted")
    kept = len(copied)  # W at the forwards that used a Ŵ, for the staleness
    copied.clear()
    current = run_biases("pipeoptim", 3, 12)
    assert 0 < kept < len(copied)  # and the Ŵ the policy overwrites
    assert consistent.prediction_error == pytest.approx(current.prediction_error, abs=1e-9)
    assert consistent.prediction_error[0] == pytest.approx(2 / 12, abs=1e-6)
    assert consistent.staleness == pytest.approx(current.staleness, abs=1e-9)


def test_copies_are_kept_for_later_samples_and_bounded_by_those_in_flight() -> None:
    """Sampling every micro-batch for 40 mini-batches: each stage keeps at most as many sets
    of copies as micro-batches it has in flight (two per micro-batch where the forward uses Ŵ,
    one for the staleness), whatever the length of the run."""
    for method, per in (("none", 1), ("pipeoptim", 2)):
        for steps in (12, 40):
            pools.clear()
            run_biases(method, 3, steps)
            held = [len(free) for free in pools]
            assert held[2] == 0  # the last stage: no step before the backward, nothing copied
            assert 1 <= held[0] <= per * 3 and 1 <= held[1] <= per * 2, (method, steps, held)


def test_copy_pool_reuses_matching_buffers() -> None:
    pool = CopyPool()
    a = [torch.randn(3, 2), torch.randn(4)]
    first = pool.copy(a)
    assert all(torch.equal(x, y) and x.data_ptr() != y.data_ptr() for x, y in zip(first, a))
    pool.give_back(first)
    b = [torch.randn(3, 2), torch.randn(4)]
    second = pool.copy(b)
    assert [t.data_ptr() for t in second] == [t.data_ptr() for t in first]  # no allocation
    assert all(torch.equal(x, y) for x, y in zip(second, b))
    pool.give_back(second)
    other = pool.copy([torch.randn(2, 3)])  # another shape: a fresh copy
    assert other[0].shape == (2, 3) and other[0].data_ptr() not in {t.data_ptr() for t in first}


def test_squared_distances_equal_float64_sums() -> None:
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(64, 33, generator=g), torch.randn(7, generator=g).to(torch.bfloat16)]
    others = [[t + 0.01 * torch.randn(t.shape, generator=g).to(t.dtype) for t in ref] for _ in range(2)]
    distances, norm = squared_distances(others, ref)
    assert norm == pytest.approx(sum(t.double().square().sum().item() for t in ref), rel=1e-5)
    for got, a in zip(distances, others):
        expected = sum((x.double() - y.double()).square().sum().item() for x, y in zip(a, ref))
        assert got == pytest.approx(expected, rel=1e-3)  # bfloat16 differences in bfloat16


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_synchronous_schedules_have_no_error(method: str) -> None:
    stats = run_biases(method, 3, 6)
    assert all(n >= 6 for n in stats.prediction_error_samples), stats
    assert stats.prediction_error == [0.0, 0.0, 0.0]


def test_no_step_before_the_backward_is_proven_by_version_counters() -> None:
    """Version difference 0: no copy is made; unchanged version counters give exactly 0, and a
    weight changed in place in between (not by a step) drops the sample with a warning."""
    w = torch.ones(3, requires_grad=True)
    meter = PredictionErrorMeter(1)
    meter.forward(0, [w], [w], 0)
    meter.backward(0, [w])
    assert meter.result() == PredictionError(0.0, 1, 0.0)
    meter.forward(1, [w], [w], 0)
    with torch.no_grad():
        w.add_(1.0)
    with pytest.warns(UserWarning, match="changed in place .* micro-batch 1"):
        meter.backward(1, [w])
    assert meter.result().samples == 1
    meter.forward(2, [w], [w], 1)  # a step comes between: the copy measures it
    with torch.no_grad():
        w.mul_(2.0)
    meter.backward(2, [w])
    assert meter.result().samples == 2
    assert meter.result().mean == pytest.approx(0.5 / 2)  # (0 + ‖2 − 4‖/‖4‖) / 2


def test_2bw_last_stage_is_measured_though_no_step_comes_between() -> None:
    """2BW's last stage runs a micro-batch's forward and backward back to back (version
    difference 0) but on the shadow W(t−1), not on W: its error is measured (the copy path),
    not assumed 0, and nothing is dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = run_biases("2bw", 2, 12)
    assert stats.prediction_error_samples[1] == 2 * 12  # every micro-batch of 12 mini-batches of M = 2
    assert stats.prediction_error[1] > 0.05
    assert stats.staleness[1] == 0.0  # W current at the forward is W at the backward


def test_sampling_every_fourth_micro_batch() -> None:
    stats = run_biases("none", 2, 12, every=4)
    assert stats.prediction_error_samples == [3, 3]  # mini-batches 0, 4, 8
    assert stats.prediction_error[0] == pytest.approx((0 + 1 / 4 + 1 / 8) / 3, abs=1e-6)


def test_off_measures_nothing() -> None:
    stats = run_biases("none", 2, 4, every=0)
    assert stats.prediction_error == [None, None] and stats.prediction_error_samples == [0, 0]
    assert stats.staleness == [None, None]


def test_bad_sampling_interval_is_refused() -> None:
    model = Biases()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="prediction_error_every must be 0 \\(off\\) or a positive integer"):
        pipeoptim.compile(
            model, opt, 2, example_inputs=torch.randn(2, 4), loss_fn=F.mse_loss, prediction_error_every=-1
        )
    with pytest.raises(ValueError, match="prediction_error_every"):
        PredictionErrorMeter(-2)


def test_worker_processes_measure_the_same_values() -> None:
    local = run_biases("none", 2, 8)
    processes = run_biases("none", 2, 8, executor="processes")
    assert processes.prediction_error_samples == local.prediction_error_samples
    assert processes.prediction_error == pytest.approx(local.prediction_error, abs=1e-12)
    assert processes.staleness == pytest.approx(local.staleness, abs=1e-12)
    assert processes.peak_weight_versions == local.peak_weight_versions


def test_pipeoptim_predicts_better_than_no_correction_on_a_smooth_problem() -> None:
    """Least squares with a deep linear network and SGD with momentum, 4 stages: PipeOptim's Ŵ
    is closer to the weights the backward meets than the stale W that no correction uses."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    stats = {}
    for method in ("none", "pipeoptim"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
        with pipeoptim.compile(
            model,
            opt,
            4,
            example_inputs=x[:16],
            loss_fn=F.mse_loss,
            method=method,
            executor="local",
            profile_dir=None,
            prediction_error_every=1,
        ) as pipe:
            for t in range(60):
                rows = slice(16 * (t % 4), 16 * (t % 4) + 16)
                pipe.step(x[rows], y[rows])
            pipe.flush()
            stats[method] = pipe.stats()
    errors = {m: s.prediction_error for m, s in stats.items()}
    stale = [k for k in range(3) if errors["none"][k] and errors["pipeoptim"][k] is not None]
    assert len(stale) >= 2, errors
    for k in stale:
        assert errors["pipeoptim"][k] < 0.5 * errors["none"][k], errors
        # and on PipeOptim's own trajectory Ŵ beats the weights current at the forward
        assert errors["pipeoptim"][k] < 0.5 * stats["pipeoptim"].staleness[k], stats
