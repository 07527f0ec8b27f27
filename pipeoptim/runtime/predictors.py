"""Weight predictors: the next update of each ``torch.optim`` optimizer, from its own rule.

PipeOptim (Guan et al., arXiv:2312.00839) predicts the weights a mini-batch's backward will
meet ``s`` optimizer steps later as

    Ŵ = W − lr · s · ΔW,

where ΔW is the update direction of the optimizer in use. Under a learning-rate schedule the
runtime predicts with the rates of the s steps themselves, ``Ŵ = W − (Σ lr_i) · ΔW``
(:func:`predict` with ``lr_sum``), which is the formula above for a constant rate.

A predictor here returns the whole update ``U = lr · ΔW`` for one parameter, reading the
optimizer's state and the parameter group's hyperparameters *at prediction time* (so
learning-rate schedulers are followed), or ``None`` before the first step (no state yet:
then Ŵ = W). Where a rule needs the next gradient, the last one (still in ``param.grad``
after the step) stands in for it.

Register predictors for other optimizers with :func:`register_predictor`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch.optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

from pipeoptim.errors import PredictorError

#: ``predictor(param, state, group) -> U`` (the next update, ``lr`` included) or ``None``.
Predictor = Callable[[torch.Tensor, dict, dict], "torch.Tensor | None"]

_PREDICTORS: dict[type[Optimizer], Predictor] = {}
_NEXT_STEP: dict[type[Optimizer], Predictor] = {}

#: ``predictor=`` choices: the paper's ΔW, or the real next step if the last gradient repeats.
VARIANTS = ("paper", "next-step")


def register_predictor(optimizer_class: type[Optimizer], predictor: Predictor) -> None:
    """Use ``predictor`` for ``optimizer_class`` (and its subclasses without their own).

    ``predictor(param, state, group)`` gets the parameter, ``optimizer.state[param]`` and the
    parameter's group dict, and returns the update ``U`` such that the next step is
    ``W <- W - U``, or ``None`` when it cannot tell yet (Ŵ = W is used).
    """
    _PREDICTORS[optimizer_class] = predictor


def borrowed_rule(cls: type[Optimizer], variant: str = "paper") -> type[Optimizer] | None:
    """The class whose registered predictor ``cls`` is predicted with where ``cls`` has none of
    its own but writes its own ``step()``, a rule that predictor may not follow
    (``class SignSGD(SGD)`` stepping ``lr · sign(g)`` gets SGD's ``lr · g``); else ``None``.
    (torch wraps ``step`` in a profiling hook on first use: compared as written.)"""
    table = _PREDICTORS if variant == "paper" else _NEXT_STEP
    owner = next((k for k in cls.__mro__ if k in table), None)
    if owner is None or owner is cls or inspect.unwrap(cls.step) is inspect.unwrap(owner.step):
        return None
    return owner


def registered_for(cls: type[Optimizer]) -> list[tuple[type[Optimizer], Predictor | None, Predictor | None]]:
    """The predictors registered for ``cls`` and its bases, ``(class, paper, next-step)``, for
    a worker process to register again (:func:`register_again`): a class defined in
    ``__main__`` reaches a worker by value, a new class object its own registry does not hold
    (the worker re-running the script registers another copy)."""
    return [
        (k, _PREDICTORS.get(k), _NEXT_STEP.get(k)) for k in cls.__mro__ if k in _PREDICTORS or k in _NEXT_STEP
    ]


def register_again(entries: list[tuple[type[Optimizer], Predictor | None, Predictor | None]]) -> None:
    """Register what :func:`registered_for` returned (unpickled with the optimizer class)."""
    for klass, paper, next_step in entries:
        if paper is not None:
            _PREDICTORS[klass] = paper
        if next_step is not None:
            _NEXT_STEP[klass] = next_step


def get_predictor(optimizer: Optimizer | type[Optimizer], variant: str = "paper") -> Predictor:
    """The predictor for ``optimizer`` (an instance or a class).

    Args:
        variant: ``"paper"`` (PipeOptim's ΔW from the optimizer's state as it stands) or
            ``"next-step"`` (the optimizer's real next update if the last gradient repeats,
            :func:`adam_next_step` and the like; SGD's paper rule is already that).

    Raises:
        ValueError: unknown ``variant``.
        PredictorError: none is registered; the message lists the supported optimizers and
            how to register one.
    """
    if variant not in VARIANTS:
        raise ValueError(f"predictor must be one of {', '.join(VARIANTS)}, not {variant!r}")
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    table = _PREDICTORS if variant == "paper" else _NEXT_STEP
    for klass in cls.__mro__:
        if klass in table:
            return table[klass]
    supported = ", ".join(sorted(k.__name__ for k in table))
    if variant == "next-step":
        raise PredictorError(
            f"no next-step predictor for {cls.__name__}: predictor='next-step' supports {supported}; "
            "use predictor='paper' (the default)"
        )
    if any(k.__qualname__ == cls.__qualname__ for k in table):
        supported += (
            f" (another class named {cls.__qualname__}: register_predictor must get the class the "
            "optimizer is an instance of, not a copy of it)"
        )
    raise PredictorError(
        f"no weight predictor for {cls.__name__}: method 'pipeoptim' supports {supported}. "
        "Register one with pipeoptim.register_predictor(YourOptimizer, fn) where "
        "fn(param, state, group) returns the next update U (W <- W - U), or choose another "
        "method (e.g. method='pipedream')"
    )


def _last_grad(param: torch.Tensor, group: dict) -> torch.Tensor | None:
    """The last gradient as the optimizer would use it: negated if ``maximize``, plus L2 decay."""
    if param.grad is None:
        return None
    grad = -param.grad if group.get("maximize", False) else param.grad
    decay = group.get("weight_decay", 0.0)
    return grad.add(param.detach(), alpha=decay) if decay else grad


def _dense(grad: torch.Tensor | None) -> torch.Tensor | None:
    """A sparse gradient (``nn.Embedding(sparse=True)``) as a dense tensor, for predictors that
    divide by dense state: torch divides a sparse tensor by a scalar only. Where ``g`` is 0 the
    update is 0, as ``torch.optim.Adagrad``'s sparse step leaves those rows alone."""
    return grad.to_dense() if grad is not None and grad.is_sparse else grad


def _scalar(x: float | torch.Tensor) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def sgd(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """SGD (``torch.optim.SGD``), following its update rule with the last gradient g:

    - plain: ``U = lr · g``;
    - momentum μ, dampening τ: ``b' = μ·b + (1−τ)·g``, ``U = lr · b'`` (the momentum buffer of
      the next step; PipeOptim's ΔW for SGD with momentum, as in its reference code);
    - Nesterov: ``U = lr · (g + μ·b')``.

    ``g`` includes weight decay (``g + λ·W``) and is negated under ``maximize``.
    """
    lr = _scalar(group["lr"])
    grad = _last_grad(param, group)
    momentum = group.get("momentum", 0.0)
    if not momentum:
        return None if grad is None else grad * lr
    buf = state.get("momentum_buffer")
    if buf is None:
        return None
    update = buf.mul(momentum * lr)  # one new tensor, then in place: lr · b'
    if grad is not None:
        update.add_(grad, alpha=(1 - group.get("dampening", 0.0)) * lr)
        if group.get("nesterov", False):
            update.mul_(momentum).add_(grad, alpha=lr)  # lr · (g + μ·b')
    return update


def adam(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """Adam and AdamW (``torch.optim.Adam`` / ``AdamW``), PipeOptim's ΔW for them:

    ``U = lr · m̂ / (√v̂ + ε)`` with ``m̂ = m / (1 − β1^t)``, ``v̂ = v / (1 − β2^t)`` from the
    optimizer's ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad) and ``step`` t.
    AdamW (or Adam with ``decoupled_weight_decay``) adds the decoupled decay ``lr · λ · W``.
    Adam's own (coupled) weight decay is already inside m and v.
    """
    if "exp_avg" not in state:
        return None
    t = _scalar(state["step"])
    beta1, beta2 = group["betas"]
    lr, eps = _scalar(group["lr"]), group["eps"]
    second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    denom = second.sqrt().div_((1 - beta2**t) ** 0.5).add_(eps)
    update = torch.div(state["exp_avg"], denom, out=denom).mul_(lr / (1 - beta1**t))
    decoupled = group.get("decoupled_weight_decay", False) or group.get("_pipeoptim_adamw", False)
    if decoupled and group.get("weight_decay", 0.0):
        update.add_(param.detach(), alpha=lr * group["weight_decay"])
    return update


def adamw(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """AdamW: :func:`adam` plus the decoupled weight decay ``lr · λ · W``."""
    return adam(param, state, {**group, "_pipeoptim_adamw": True})


def rmsprop(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """RMSprop (``torch.optim.RMSprop``) with the last gradient g (weight decay included):

    ``a = √v + ε`` (centered: ``√(v − ḡ²) + ε``); with momentum μ,
    ``b' = μ·b + g / a`` and ``U = lr · b'``; without, ``U = lr · g / a``.
    """
    if "square_avg" not in state:
        return None
    lr = _scalar(group["lr"])
    avg = state["square_avg"]
    if group.get("centered", False):
        avg = avg - state["grad_avg"] ** 2
    avg = avg.sqrt() + group["eps"]
    grad = _last_grad(param, group)
    momentum = group.get("momentum", 0.0)
    if momentum:
        buf = state["momentum_buffer"] * momentum
        return (buf if grad is None else buf + grad / avg) * lr
    return None if grad is None else grad / avg * lr


def adagrad(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """Adagrad (``torch.optim.Adagrad``) with the last gradient g (weight decay included):

    ``U = lr / (1 + t · lr_decay) · g / (√sum + ε)`` for the next step t + 1.
    """
    grad = _dense(_last_grad(param, group))
    if "sum" not in state or grad is None:
        return None
    t = _scalar(state["step"])
    clr = _scalar(group["lr"]) / (1 + t * group.get("lr_decay", 0.0))
    return grad / (state["sum"].sqrt() + group["eps"]) * clr


def adam_next_step(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """Adam and AdamW, next-step variant: the last gradient g (L2 decay included for Adam,
    negated under ``maximize``) is folded into the moments first, ``m' = β1·m + (1 − β1)·g``,
    ``v' = β2·v + (1 − β2)·g²`` (amsgrad: ``max(v_max, v')``), ``t' = t + 1``, then
    ``U = lr · m̂' / (√v̂' + ε)`` (+ ``lr · λ · W`` decoupled): exactly the update
    ``torch.optim.Adam``/``AdamW`` makes next if g repeats."""
    if "exp_avg" not in state or param.grad is None:
        return None
    decoupled = group.get("decoupled_weight_decay", False) or group.get("_pipeoptim_adamw", False)
    g = _last_grad(param, {**group, "weight_decay": 0.0} if decoupled else group)
    assert g is not None
    t = _scalar(state["step"]) + 1
    beta1, beta2 = group["betas"]
    lr, eps = _scalar(group["lr"]), group["eps"]
    m = state["exp_avg"].mul(beta1).add_(g, alpha=1 - beta1)
    v = state["exp_avg_sq"].mul(beta2).addcmul_(g, g, value=1 - beta2)
    if group.get("amsgrad", False):
        v = torch.maximum(state["max_exp_avg_sq"], v)
    denom = v.sqrt_().div_((1 - beta2**t) ** 0.5).add_(eps)
    update = m.div_(denom).mul_(lr / (1 - beta1**t))
    if decoupled and group.get("weight_decay", 0.0):
        update.add_(param.detach(), alpha=lr * group["weight_decay"])
    return update


def adamw_next_step(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """AdamW, next-step variant (:func:`adam_next_step` with the decoupled decay)."""
    return adam_next_step(param, state, {**group, "_pipeoptim_adamw": True})


def rmsprop_next_step(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """RMSprop, next-step variant: ``v' = α·v + (1 − α)·g²`` (centered:
    ``ḡ' = α·ḡ + (1 − α)·g``, ``a = √(v' − ḡ'²) + ε``, else ``a = √v' + ε``), then
    ``U = lr · (μ·b + g / a)`` with momentum μ, ``lr · g / a`` without: the next update of
    ``torch.optim.RMSprop`` if the last gradient g repeats."""
    grad = _last_grad(param, group)
    if "square_avg" not in state or grad is None:
        return None
    alpha, lr = group["alpha"], _scalar(group["lr"])
    avg = state["square_avg"].mul(alpha).addcmul_(grad, grad, value=1 - alpha)
    if group.get("centered", False):
        mean = state["grad_avg"].mul(alpha).add_(grad, alpha=1 - alpha)
        avg = avg.addcmul_(mean, mean, value=-1)
    avg = avg.sqrt_().add_(group["eps"])
    momentum = group.get("momentum", 0.0)
    step = grad / avg
    if momentum:
        step = step.add_(state["momentum_buffer"], alpha=momentum)
    return step.mul_(lr)


def adagrad_next_step(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    """Adagrad, next-step variant: ``sum' = sum + g²``, then
    ``U = lr / (1 + t · lr_decay) · g / (√sum' + ε)``: the next update of
    ``torch.optim.Adagrad`` if the last gradient g repeats."""
    grad = _dense(_last_grad(param, group))
    if "sum" not in state or grad is None:
        return None
    t = _scalar(state["step"])
    clr = _scalar(group["lr"]) / (1 + t * group.get("lr_decay", 0.0))
    return grad / (state["sum"].addcmul(grad, grad).sqrt_().add_(group["eps"])) * clr


register_predictor(SGD, sgd)
register_predictor(Adam, adam)
register_predictor(AdamW, adamw)
register_predictor(RMSprop, rmsprop)
register_predictor(Adagrad, adagrad)
_NEXT_STEP.update(
    {
        SGD: sgd,  # the paper's SGD rule already folds the last gradient into the momentum
        Adam: adam_next_step,
        AdamW: adamw_next_step,
        RMSprop: rmsprop_next_step,
        Adagrad: adagrad_next_step,
    }
)


@torch.no_grad()
def predict(
    param: torch.Tensor,
    state: dict,
    group: dict,
    steps: int,
    predictor: Predictor,
    out: torch.Tensor | None = None,
    lr_sum: float | None = None,
) -> torch.Tensor:
    """Predicted weights after ``steps`` more steps, written into ``out`` (a tensor shaped
    like ``param``) when given, else into a new tensor.

    Without ``lr_sum``: ``Ŵ = W − steps · U`` with U at the group's current rate, i.e.
    ``W − lr · s · ΔW`` (PipeOptim, arXiv:2312.00839). With ``lr_sum`` (the sum of
    the learning rates of the ``steps`` steps to come): ``Ŵ = W − (Σ lr_i) · ΔW``, computed as
    ``steps · U`` with U at the mean rate ``lr_sum / steps``; the two agree for a constant
    rate, and the sum is exact for a scheduled rate wherever ΔW is (U is proportional to
    ``lr`` for every built-in predictor; Adagrad's ``lr_decay`` is applied at the mean rate).

    ``state`` is ``optimizer.state[param]`` and ``group`` the parameter's group. Returns
    ``param.detach()`` itself when ``steps`` is 0 or the optimizer has no state yet.
    """
    if steps == 0:
        return param.detach()
    if lr_sum is not None:
        group = {**group, "lr": lr_sum / steps}
    update = predictor(param, state, group)
    if update is None:
        return param.detach()
    return torch.add(param.detach(), update, alpha=-steps, out=out)
