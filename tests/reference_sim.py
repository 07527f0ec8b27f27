"""An independent reference for the pipeline methods, written from the papers in plain loops.

Nothing here imports the library: the model is a chain of ``Linear`` layers with ``tanh``
between them, written out by hand (forward and backward), the optimizers are the update
rules of the ``torch.optim`` documentation written out by hand, and every method is a rule
for *which weight version each stage uses for the forward and the backward of mini-batch t*.
Training then runs mini-batch after mini-batch; since every stage keeps all its versions
(``W_k(0), W_k(1), ...``, ``W_k(v)`` = after ``v`` updates), no schedule has to be simulated.

Stage k of N (0-based), mini-batch t (0-based), no flush between mini-batches:

- asynchronous 1F1B (PipeDream, Narayanan et al. SOSP 2019): stage k runs
  ``N − k − 1`` warm-up forwards, then the backward of mini-batch t follows ``t`` updates
  and its forward follows ``v_f = max(0, t − (N − k − 1))``; the version difference is
  ``s = t − v_f`` (``N − k − 1`` in the steady state).
- ``pipedream`` (weight stashing): forward and backward both use ``W_k(v_f)``.
- ``none``: forward ``W_k(v_f)``, backward ``W_k(t)``.
- ``pipeoptim`` (Guan et al., arXiv:2312.00839): forward
  ``Ŵ = W_k(v_f) − (Σ lr_i)·ΔW`` over the ``s`` steps between forward and backward (those
  of mini-batches ``v_f .. t−1``; ``s·lr`` for a constant rate, the paper's formula), ΔW the
  optimizer's update direction read at version ``v_f``; backward ``W_k(t)``.
- ``2bw`` (PipeDream-2BW, Narayanan et al. ICML 2021): ``W(t+1) = W(t) − ν·∇f(W(t−1))``:
  every stage computes mini-batch t on ``W_k(max(0, t − 1))``.
- ``spectrain`` (Chen et al., arXiv:1809.02839): ``Ŵ = W − s·lr·v`` with the smoothed
  gradient ``v`` (SGD's momentum buffer as it stands) in both passes, ``s_f = ⌊k/2⌋ + N − k − 1``
  from ``W_k(v_f)`` and ``s_b = ⌊k/2⌋`` from ``W_k(t)`` (the reference code's version
  differences), ``lr`` the rate current at the prediction: the forward's own, and in the
  backward that of the newest mini-batch forwarded at stage k, ``t + N − k − 1`` (or the last
  one before the next flush).
- ``gpipe``, ``1f1b`` (flush every mini-batch): both passes use ``W_k(t)``.

Mini-batch t is updated with learning rate ``lrs[t]`` and hyperparameters ``opts[t]``, which
PipeOptim's ΔW also reads in the forward of mini-batch t. A flush before mini-batch ``t0``
(``flushes``) finishes every mini-batch before it: asynchronous 1F1B then starts again with a
warm-up, ``v_f = max(t0, t − (N − k − 1))``. The loss is the mean squared error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

METHODS = ("pipeoptim", "pipedream", "2bw", "spectrain", "none", "gpipe", "1f1b")


@dataclass
class Opt:
    """An optimizer's hyperparameters (names as in ``torch.optim``)."""

    kind: str  # "sgd", "adam" or "adamw"
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class Version:
    """One parameter after some updates: its value, optimizer state, last gradient used."""

    w: torch.Tensor
    state: dict[str, torch.Tensor | int] = field(default_factory=dict)
    grad: torch.Tensor | None = None


def update(ver: Version, grad: torch.Tensor, lr: float, opt: Opt) -> Version:
    """One optimizer step, as the ``torch.optim`` documentation writes it."""
    w, state = ver.w, dict(ver.state)  # tensors are replaced, never changed in place
    if opt.kind == "sgd":
        g = grad + opt.weight_decay * w
        if opt.momentum:
            if "buf" not in state:
                state["buf"] = g.clone()
            else:
                state["buf"] = opt.momentum * state["buf"] + (1 - opt.dampening) * g
            g = state["buf"]
        w = w - lr * g
    else:
        g = grad
        if opt.kind == "adamw":
            w = w * (1 - lr * opt.weight_decay)
        elif opt.weight_decay:
            g = g + opt.weight_decay * w
        b1, b2 = opt.betas
        t = int(state.get("t", 0)) + 1
        m = b1 * state.get("m", torch.zeros_like(w)) + (1 - b1) * g
        v = b2 * state.get("v", torch.zeros_like(w)) + (1 - b2) * g * g
        state.update(t=t, m=m, v=v)
        w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + opt.eps)
    return Version(w, state, grad.clone())


def direction(ver: Version, opt: Opt, predictor: str = "paper") -> torch.Tensor | None:
    """PipeOptim's ΔW at this version (``None`` before the first update: then Ŵ = W).

    SGD with momentum μ: ``μ·b + (1 − τ)·(g + λ·W)`` with the last gradient g (the momentum
    buffer of the next step if g repeats). Adam: ``m̂/(√v̂ + ε)``, AdamW adds ``λ·W``. With
    ``predictor="next-step"`` Adam's moments first take in the last gradient g once more
    (``m' = β1·m + (1 − β1)·g``, ``v' = β2·v + (1 − β2)·g²``, ``t + 1``).
    """
    if not ver.state:
        return None
    if opt.kind == "sgd" and ver.grad is None:  # after a skipped step: no last gradient
        return opt.momentum * ver.state["buf"]
    assert ver.grad is not None
    if opt.kind == "sgd":
        g = ver.grad + opt.weight_decay * ver.w
        return opt.momentum * ver.state["buf"] + (1 - opt.dampening) * g
    b1, b2 = opt.betas
    m, v, t = ver.state["m"], ver.state["v"], int(ver.state["t"])
    if predictor == "next-step":
        g = ver.grad + opt.weight_decay * ver.w if opt.kind == "adam" else ver.grad
        m, v, t = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g, t + 1
    d = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + opt.eps)
    return d + opt.weight_decay * ver.w if opt.kind == "adamw" else d


def forward_backward(
    fwd: list[torch.Tensor], bwd: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[float, list[torch.Tensor]]:
    """Loss and parameter gradients of the tanh MLP, by hand.

    ``fwd`` holds ``[W0, b0, W1, b1, ...]`` used by the forward; ``bwd`` the weights each
    layer's backward multiplies the gradient by (``dx = dz @ W``). Activations and the tanh
    derivative come from the forward.
    """
    layers = len(fwd) // 2
    acts = [x]
    h = x
    for i in range(layers):
        z = h @ fwd[2 * i].T + fwd[2 * i + 1]
        h = torch.tanh(z) if i < layers - 1 else z
        acts.append(h)
    loss = ((h - y) ** 2).mean()
    d = 2 * (h - y) / h.numel()
    grads: list[torch.Tensor] = [torch.empty(0)] * len(fwd)
    for i in reversed(range(layers)):
        if i < layers - 1:
            d = d * (1 - acts[i + 1] ** 2)
        grads[2 * i], grads[2 * i + 1] = d.T @ acts[i], d.sum(0)
        d = d @ bwd[2 * i]
    return float(loss), grads


def simulate(
    method: str,
    params: list[torch.Tensor],
    stage_of_layer: list[int],
    num_stages: int,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    lrs: list[float],
    opt: Opt | Sequence[Opt],
    predictor: str = "paper",
    lr_rule: str = "sum",
    version_shift: int = 0,
    grad_rule: Callable[[int, list[torch.Tensor]], list[torch.Tensor | None]] | None = None,
    flushes: Sequence[int] = (),
) -> tuple[list[float], list[torch.Tensor]]:
    """Train with ``method``; returns the loss of every mini-batch and the final parameters.

    Args:
        params: ``[W0, b0, W1, b1, ...]`` initial values.
        stage_of_layer: stage of each layer.
        lrs: learning rate of each mini-batch's update.
        opt: the optimizer's hyperparameters, or those of each mini-batch.
        lr_rule: PipeOptim's rate: ``"sum"`` of the rates of the s steps in between, or
            ``"current"``: s × the rate of the mini-batch being forwarded.
        version_shift: added to every version difference (a deliberately wrong rule).
        grad_rule: ``grad_rule(t, grads)`` turns mini-batch t's gradients into those each
            parameter is updated with (clipping), ``None`` where the step is skipped (the
            version then repeats, with no last gradient).
        flushes: the mini-batches before which the pipeline flushes.
    """
    assert method in METHODS, method
    n = num_stages
    opts = [opt] * len(batches) if isinstance(opt, Opt) else list(opt)
    starts = sorted({0, *flushes})
    hist = [[Version(p.clone())] for p in params]  # hist[j][v]: parameter j after v updates
    losses = []
    for t, (x, y) in enumerate(batches):
        start = max(f for f in starts if f <= t)
        end = min([f for f in starts if f > t] + [len(batches)])  # the next flush
        fwd, bwd = [], []
        for j, chain in enumerate(hist):
            k = stage_of_layer[j // 2]
            v_f = max(start, t - (n - k - 1))
            if method in ("gpipe", "1f1b"):
                v_f = t
            elif method == "2bw":
                v_f = max(0, t - 1)
            now = chain[t]
            ver = chain[v_f]
            if method in ("gpipe", "1f1b", "pipedream", "2bw"):
                fwd.append(ver.w)
                bwd.append(ver.w)
            elif method == "none":
                fwd.append(ver.w)
                bwd.append(now.w)
            elif method == "pipeoptim":
                s = t - v_f + version_shift
                d = direction(ver, opts[t], predictor)
                rate = sum(lrs[v_f : v_f + s]) if lr_rule == "sum" else s * lrs[t]
                fwd.append(ver.w if d is None or s == 0 else ver.w - rate * d)
                bwd.append(now.w)
            else:  # spectrain: the momentum buffer is the smoothed gradient, in both passes
                s_f, s_b = k // 2 + n - k - 1 + version_shift, k // 2
                fwd.append(ver.w - s_f * lrs[t] * ver.state["buf"] if ver.state else ver.w)
                newest = min(t + n - k - 1, end - 1)
                bwd.append(now.w - s_b * lrs[newest] * now.state["buf"] if now.state else now.w)
        loss, grads = forward_backward(fwd, bwd, x, y)
        losses.append(loss)
        used = grad_rule(t, grads) if grad_rule is not None else grads
        for chain, g in zip(hist, used):
            skipped = Version(chain[t].w, chain[t].state)
            chain.append(update(chain[t], g, lrs[t], opts[t]) if g is not None else skipped)
    return losses, [chain[-1].w for chain in hist]


def cosine_rates(base: float, t_max: int, count: int) -> list[float]:
    """``CosineAnnealingLR`` (η_min = 0): ``η_t = base·(1 + cos(π·t/T))/2``."""
    return [base * (1 + math.cos(math.pi * t / t_max)) / 2 for t in range(count)]
