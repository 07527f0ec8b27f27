"""Weight predictors against hand-computed values and against real optimizer steps."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeoptim.errors import PredictorError
from pipeoptim.runtime.predictors import borrowed_rule, get_predictor, predict, register_predictor

from .test_optimizer_handover import SignSGD

CONFIGS = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.01, "maximize": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.02}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
    (torch.optim.RMSprop, {"lr": 0.01}),
    (torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 0.1}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "eps": 1e-8}),
]


def trained(cls, kwargs, steps: int = 3):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = cls([w], **kwargs)
    for _ in range(steps):
        w.grad = torch.randn(4, 3)
        opt.step()
    return w, opt


def by_hand(cls, kwargs, w: torch.Tensor, state: dict) -> torch.Tensor:
    """The next update U, written out from each optimizer's documented rule."""
    lr = kwargs["lr"]
    g = w.grad.clone()
    if kwargs.get("maximize"):
        g = -g
    W = w.detach()
    wd = kwargs.get("weight_decay", 0.0)
    if cls is torch.optim.SGD:
        g = g + wd * W
        mu = kwargs.get("momentum", 0.0)
        if not mu:
            return lr * g
        b = mu * state["momentum_buffer"] + (1 - kwargs.get("dampening", 0.0)) * g
        return lr * (g + mu * b) if kwargs.get("nesterov") else lr * b
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        t = float(state["step"])
        b1, b2 = kwargs.get("betas", (0.9, 0.999))
        v = state["max_exp_avg_sq"] if kwargs.get("amsgrad") else state["exp_avg_sq"]
        m_hat = state["exp_avg"] / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        u = lr * m_hat / (v_hat.sqrt() + kwargs.get("eps", 1e-8))
        return u + lr * wd * W if cls is torch.optim.AdamW else u
    if cls is torch.optim.RMSprop:
        g = g + wd * W
        v = state["square_avg"]
        if kwargs.get("centered"):
            v = v - state["grad_avg"] ** 2
        avg = v.sqrt() + kwargs.get("eps", 1e-8)
        mu = kwargs.get("momentum", 0.0)
        return lr * (mu * state["momentum_buffer"] + g / avg) if mu else lr * g / avg
    if cls is torch.optim.Adagrad:
        t = float(state["step"])
        clr = lr / (1 + t * kwargs.get("lr_decay", 0.0))
        return clr * (g + wd * W) / (state["sum"].sqrt() + kwargs.get("eps", 1e-10))
    raise AssertionError(cls)


@pytest.mark.parametrize("cls, kwargs", CONFIGS)
def test_prediction_equals_hand_computed(cls, kwargs) -> None:
    w, opt = trained(cls, kwargs)
    group = opt.param_groups[0]
    for s in (1, 3):
        got = predict(w, opt.state[w], group, s, get_predictor(opt))
        expected = w.detach() - s * by_hand(cls, kwargs, w, opt.state[w])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls, kwargs", [c for c in CONFIGS if c[0] is torch.optim.SGD])
def test_sgd_prediction_is_exact_when_the_gradient_repeats(cls, kwargs) -> None:
    w, opt = trained(cls, kwargs)
    predicted = predict(w, opt.state[w], opt.param_groups[0], 1, get_predictor(opt))
    opt.step()  # the same gradient once more
    torch.testing.assert_close(predicted, w.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls, kwargs", CONFIGS)
def test_no_state_means_no_change(cls, kwargs) -> None:
    w = torch.nn.Parameter(torch.randn(3))
    opt = cls([w], **kwargs)
    got = predict(w, opt.state.get(w, {}), opt.param_groups[0], 4, get_predictor(opt))
    assert torch.equal(got, w.detach())


def test_learning_rate_is_read_at_prediction_time() -> None:
    w, opt = trained(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    predictor = get_predictor(opt)
    before = w.detach() - predict(w, opt.state[w], opt.param_groups[0], 2, predictor)
    opt.param_groups[0]["lr"] = 0.025  # what a scheduler does
    after = w.detach() - predict(w, opt.state[w], opt.param_groups[0], 2, predictor)
    torch.testing.assert_close(after, before / 4)


def test_unknown_optimizer_lists_supported_and_how_to_register() -> None:
    class Lion(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-4):
            super().__init__(params, {"lr": lr})

    opt = Lion([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(PredictorError) as info:
        get_predictor(opt)
    text = str(info.value)
    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "register_predictor"):
        assert name in text

    register_predictor(Lion, lambda p, state, group: torch.full_like(p, group["lr"]))
    p = opt.param_groups[0]["params"][0]
    got = predict(p, {}, opt.param_groups[0], 3, get_predictor(opt))
    torch.testing.assert_close(got, torch.full((2,), -3e-4))


def test_subclass_uses_parent_predictor() -> None:
    class MySGD(torch.optim.SGD):
        pass

    w, opt = trained(MySGD, {"lr": 0.1, "momentum": 0.9})
    reference = copy.deepcopy(opt.state[w])
    got = predict(w, opt.state[w], opt.param_groups[0], 1, get_predictor(opt))
    expected = w.detach() - 0.1 * (0.9 * reference["momentum_buffer"] + w.grad)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("cls, kwargs", CONFIGS)
def test_next_step_prediction_is_exact_when_the_gradient_repeats(cls, kwargs) -> None:
    w, opt = trained(cls, kwargs)
    state = copy.deepcopy(opt.state[w])
    predicted = predict(w, opt.state[w], opt.param_groups[0], 1, get_predictor(opt, "next-step"))
    for key, value in state.items():  # the prediction leaves the optimizer's state alone
        assert torch.equal(opt.state[w][key], value), key
    opt.step()  # the same gradient once more
    torch.testing.assert_close(predicted, w.detach(), rtol=1e-6, atol=1e-7)


def test_paper_prediction_misses_a_repeated_adam_step() -> None:
    """The paper's ΔW reads Adam's moments before the last gradient is folded in: with the
    gradient repeating it is off by a sizeable share of the step (what next-step corrects)."""
    w, opt = trained(torch.optim.Adam, {"lr": 0.01}, steps=2)
    paper = predict(w, opt.state[w], opt.param_groups[0], 1, get_predictor(opt))
    before = w.detach().clone()
    opt.step()
    step = (w.detach() - before).abs()
    miss = ((paper - w.detach()).abs() / step).max()
    assert miss > 0.05


def test_next_step_variant_errors() -> None:
    class Lion(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-4):
            super().__init__(params, {"lr": lr})

    with pytest.raises(PredictorError, match="predictor='paper'"):
        get_predictor(Lion, "next-step")
    with pytest.raises(ValueError, match="paper, next-step"):
        get_predictor(torch.optim.Adam, "newest")


@pytest.mark.parametrize("variant", ["paper", "next-step"])
def test_adagrad_predicts_from_a_sparse_gradient(variant: str) -> None:
    """``nn.Embedding(sparse=True)`` under Adagrad: the predictor divided the sparse gradient
    by the dense state, which torch refuses, so PipeOptim crashed where plain Adagrad trains
    (helper-128). The rows the gradient does not touch stay as they are."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 3))
    opt = torch.optim.Adagrad([w], lr=0.1, lr_decay=0.01)
    grad = torch.sparse_coo_tensor([[1, 4]], torch.randn(2, 3), (6, 3))
    for _ in range(2):
        w.grad = grad.clone()
        opt.step()
    state, group = opt.state[w], opt.param_groups[0]
    predicted = predict(w, state, group, 1, get_predictor(opt, variant))
    if variant == "next-step":  # the same gradient once more: torch's own sparse step
        w.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(predicted, w.detach(), rtol=1e-6, atol=1e-7)
        return
    clr = 0.1 / (1 + 2 * 0.01)
    expected = w.detach() - clr * grad.to_dense() / (state["sum"].sqrt() + group["eps"])
    torch.testing.assert_close(predicted, expected)
    assert torch.equal(predicted[[0, 2, 3, 5]], w.detach()[[0, 2, 3, 5]])


def test_a_subclass_writing_its_own_step_is_said_to_borrow_its_bases_rule() -> None:
    """``class SignSGD(SGD)`` stepping ``lr · sign(g)`` was predicted with SGD's ``lr · g``
    without a word (helper-128); a subclass that only inherits SGD's step is SGD's rule."""

    class Signed(SignSGD):  # registered below: not the class other tests compile with
        pass

    class Plain(torch.optim.SGD):
        pass

    assert borrowed_rule(Signed) is torch.optim.SGD
    assert borrowed_rule(Signed, "next-step") is torch.optim.SGD
    Plain([torch.nn.Parameter(torch.zeros(2))], lr=0.1)  # torch wraps its step on first use
    assert borrowed_rule(Plain) is None
    assert borrowed_rule(torch.optim.Adam) is None
    register_predictor(Signed, lambda p, state, group: group["lr"] * p.grad.sign())
    assert borrowed_rule(Signed) is None
