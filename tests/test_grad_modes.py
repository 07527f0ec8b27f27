"""The stages train in their own modes, whatever the caller's (pipeoptim.runtime.grad_modes):
a flush inside the caller's ``torch.inference_mode()`` or ``torch.autocast`` (``predict``
flushes first) trains as one outside them."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import pipeoptim
from pipeoptim.runtime.grad_modes import training_modes

from .test_training import data, no_dropout_cnn

CALLERS = {
    "inference mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "bfloat16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}


def trained(method: str, caller, plan=None) -> tuple[dict[str, torch.Tensor], pipeoptim.Plan]:
    """Weights after 6 mini-batches, predicting (and so flushing) after the second and the
    fourth under ``caller``: the steps between, outside it, update what the flush made; and
    the plan (given back, a run repeats the cut, on which PipeOptim's numbers depend: two runs
    planning each under load cut differently, red once in the full suite)."""
    torch.manual_seed(0)
    model = no_dropout_cnn()
    batches = data(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pipeoptim.compile(
        model,
        opt,
        2,
        example_inputs=batches[0][0],
        loss_fn=F.cross_entropy,
        method=method,
        executor="local",
        profile_dir=None,
        plan=plan,
    ) as pipe:
        for i, (x, y) in enumerate(batches):
            pipe.step(x, y)
            if i in (1, 3):
                with caller():
                    pipe.predict(x)
        return pipe.state_dict(), pipe.plan


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("method", ["1f1b", "pipeoptim"])
def test_a_flush_in_the_callers_modes_trains_as_one_outside_them(method: str, caller: str) -> None:
    """Under inference mode SGD's momentum buffer became an inference tensor the next step
    could not update (1f1b), and PipeOptim's prediction failed; under a bfloat16 autocast the
    cool-down's backward and step ran in bfloat16 (helper-148)."""
    want, plan = trained(method, contextlib.nullcontext)
    got, _ = trained(method, CALLERS[caller], plan)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_training_modes_restore_the_callers() -> None:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with training_modes():
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_inference_mode_enabled() and torch.is_autocast_enabled("cpu")
    with torch.no_grad():
        with training_modes():
            assert torch.is_grad_enabled()
        assert not torch.is_grad_enabled()
