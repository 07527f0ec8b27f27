"""The extrapolator: Ŵ = W − c·ΔW as the papers write it, ΔW once per step, buffers reused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeoptim.runtime.extrapolation import Extrapolator, per_unit_rate, sgd_direction
from pipeoptim.runtime.predictors import sgd


def _stage(momentum: float = 0.9, weight_decay: float = 0.01):
    torch.manual_seed(0)
    params = {
        "a": nn.Parameter(torch.randn(6, 5)),
        "b": nn.Parameter(torch.randn(5)),
        "c": nn.Parameter(torch.randn(3)),
    }
    opt = torch.optim.SGD(
        [{"params": [params["a"], params["b"]]}, {"params": [params["c"]], "lr": 0.05}],
        lr=0.1,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    for p in (params["a"], params["b"]):  # "c" never gets a gradient: no state, no prediction
        p.grad = torch.randn_like(p)
    opt.step()
    for p in (params["a"], params["b"]):
        p.grad = torch.randn_like(p)
    return params, opt


def test_prediction_is_the_papers_formula() -> None:
    params, opt = _stage()
    predicted = Extrapolator(params, opt, per_unit_rate(sgd)).predict([0.3, 0.7])
    assert set(predicted) == {"a", "b"}  # "c" has no state: the forward uses W itself
    for name in ("a", "b"):
        w, g = params[name].detach(), params[name].grad
        b = opt.state[params[name]]["momentum_buffer"]
        delta = 0.9 * b + (g + 0.01 * w)  # PipeOptim's ΔW for SGD: next step's momentum buffer
        torch.testing.assert_close(predicted[name], w - 0.3 * delta, rtol=0, atol=1e-6)


def test_direction_once_per_step_and_buffers_reused() -> None:
    params, opt = _stage()
    calls = []

    def direction(p: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
        calls.append(p)
        return per_unit_rate(sgd)(p, state, group)

    ex = Extrapolator(params, opt, direction)
    first = ex.predict([0.3, 0.0])
    pointers = {n: t.data_ptr() for n, t in first.items()}
    second = ex.predict([0.6, 0.0], into=first)
    assert len(calls) == 3  # once per parameter until the next step
    assert {n: t.data_ptr() for n, t in second.items()} == pointers  # written in place
    w, b = params["a"].detach(), opt.state[params["a"]]["momentum_buffer"]
    expected = w - 0.6 * (0.9 * b + params["a"].grad + 0.01 * w)
    torch.testing.assert_close(second["a"], expected, rtol=0, atol=1e-6)
    opt.step()
    ex.invalidate()
    third = ex.predict([0.3, 0.0], into=second)
    assert len(calls) == 6
    b = opt.state[params["a"]]["momentum_buffer"]
    expected = params["a"].detach() - 0.3 * (0.9 * b + params["a"].grad + 0.01 * params["a"].detach())
    torch.testing.assert_close(third["a"], expected, rtol=0, atol=1e-6)


def test_zero_coefficient_predicts_nothing() -> None:
    params, opt = _stage()
    assert Extrapolator(params, opt, per_unit_rate(sgd)).predict([0.0, 0.0]) == {}


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.02},
        {"momentum": 0.8, "nesterov": True, "weight_decay": 0.02},
        {"momentum": 0.9, "maximize": True, "weight_decay": 0.02},
        {"momentum": 0.0, "weight_decay": 0.02},
    ],
)
def test_sgd_direction_is_the_next_momentum_buffer(options: dict) -> None:
    """ΔW written from torch.optim.SGD's documented update, independently of the predictors."""
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([w], lr=0.1, **options)
    w.grad = torch.randn_like(w)
    opt.step()
    w.grad = torch.randn_like(w)
    mu, tau = options["momentum"], options.get("dampening", 0.0)
    g = (-w.grad if options.get("maximize") else w.grad) + options.get("weight_decay", 0.0) * w.detach()
    if mu:
        b = mu * opt.state[w]["momentum_buffer"] + (1 - tau) * g
        expected = g + mu * b if options.get("nesterov") else b
    else:
        expected = g
    terms = sgd_direction(w, opt.state[w], opt.param_groups[0])
    assert terms is not None
    got = sum(a * t for a, t in terms)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # and the prediction from those terms, written into a buffer term by term
    hat = Extrapolator({"w": w}, opt, sgd_direction).predict([0.25])["w"]
    torch.testing.assert_close(hat, w.detach() - 0.25 * expected, rtol=0, atol=1e-6)
