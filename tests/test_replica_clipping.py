"""Clipping by the global norm and float16 loss scaling with replicas (N stages × R replicas,
issues 15 and 18): the norm is that of the replica-summed gradient (the whole mini-batch's),
over all stages, the same on every replica; references are plain training on the whole
mini-batch with ``clip_grad_norm_`` (and ``GradScaler``)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_data_parallel import assert_replicas_identical, compile_mlp, mlp
from tests.test_loss_scaling import plain_float16_training
from tests.test_training import SGD_MOMENTUM, data, plain_training

CLIP = 0.5


@pytest.mark.parametrize(
    ("method", "executor"), [("gpipe", "local"), ("1f1b", "local"), ("1f1b", "processes")]
)
def test_clipping_with_replicas_equals_plain_training(method: str, executor: str) -> None:
    """2 stages × 2 replicas, M = 2 per replica: plain training on the whole mini-batch (its 4
    micro-batches accumulated), clipped by its global norm."""
    model = mlp()
    batches = data(6)
    unclipped, _ = plain_training(model, SGD_MOMENTUM[0], batches, micro=4)
    expected, reference = plain_training(model, SGD_MOMENTUM[0], batches, micro=4, clip=CLIP)
    assert abs(unclipped[-1] - expected[-1]) > 1e-3  # the limit binds
    options = dict(micro_batches=2, max_grad_norm=CLIP)
    with compile_mlp(copy.deepcopy(model), SGD_MOMENTUM[0], method, executor, **options) as pipe:
        assert pipe.num_stages == 2 and pipe.replicas == 2
        got = [pipe.step(x, y).item() for x, y in batches]
        if executor == "local":
            assert_replicas_identical(pipe)
        state = pipe.state_dict()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


def test_float16_with_replicas_equals_grad_scaler() -> None:
    """GPipe, 2 × 2, float16 with clipping; the first mini-batch overflows (inputs ×1e4), so
    every stage of every replica skips it and halves S, as GradScaler on the whole mini-batch."""
    model = mlp()
    batches = [(x * 1e4 if i == 0 else x, y) for i, (x, y) in enumerate(data(5))]
    expected, reference, scales = plain_float16_training(model, SGD_MOMENTUM[0], batches, micro=4, clip=CLIP)
    assert scales[0] < 2.0**16
    options = dict(micro_batches=2, max_grad_norm=CLIP, autocast=torch.float16)
    with compile_mlp(copy.deepcopy(model), SGD_MOMENTUM[0], "gpipe", "local", **options) as pipe:
        got = [pipe.step(x, y).item() for x, y in batches]
        assert_replicas_identical(pipe)
        state = pipe.state_dict()
        assert {s.scaler.scale for r in pipe._executor.replicas for s in r.stages} == {scales[-1]}
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
