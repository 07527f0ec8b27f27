"""Predicted weights at a low cost per forward: ΔW once per optimizer step, Ŵ into reused buffers.

PipeOptim (Guan et al., arXiv:2312.00839) predicts ``Ŵ = W − lr · s · ΔW`` and SpecTrain
(Chen et al., arXiv:1809.02839) ``Ŵ = W − s · lr · v``; both are ``Ŵ = W − c · D`` with
a direction D that changes only when the optimizer steps (or a backward brings a new gradient)
and a coefficient c that a stage knows when it predicts (``c = Σ lr_i`` over the s steps in
between, :mod:`pipeoptim.runtime.policies`). :class:`Extrapolator` therefore computes D once,
reuses it for every prediction until :meth:`Extrapolator.invalidate` (called by the policies
after each step and before each backward), and writes Ŵ into buffers the caller passes back
each time: no allocation follows the first prediction. Parameters without a direction (no
optimizer state yet) or with ``c = 0`` get no Ŵ: the forward uses W itself.

Ŵ is computed with one multi-tensor op per optimizer group (``torch._foreach_add``) on
accelerators and with one ``torch.add(W, D, alpha=−c, out=Ŵ)`` per parameter on the CPU,
following ``torch.optim``'s own rule (``foreach`` by default only on CUDA: on the CPU the
multi-tensor kernels run as per-tensor loops, measured slower here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from pipeoptim.runtime.predictors import sgd

#: ``direction(param, state, group) -> D`` (the update per unit learning rate) or ``None``.
Direction = Callable[[torch.Tensor, dict, dict], "torch.Tensor | None"]


def per_unit_rate(predictor: Callable[[torch.Tensor, dict, dict], torch.Tensor | None]) -> Direction:
    """The direction ``ΔW = U / lr`` of a predictor returning the update ``U = lr · ΔW``
    (:mod:`pipeoptim.runtime.predictors`): the predictor at ``lr = 1``; for SGD,
    :func:`sgd_direction` (the same ΔW, written into a reused buffer)."""
    return sgd_direction() if predictor is sgd else _at_unit_rate(predictor)


def _at_unit_rate(predictor: Callable[[torch.Tensor, dict, dict], torch.Tensor | None]) -> Direction:
    def direction(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
        return predictor(param, state, {**group, "lr": 1.0})

    return direction


def sgd_direction() -> Direction:
    """PipeOptim's ΔW for ``torch.optim.SGD`` with momentum μ, dampening τ, weight decay λ:
    the next step's momentum buffer ``μ·b + (1 − τ)·g'`` with ``g' = ±g + λ·W`` (Nesterov:
    ``g' + μ·(μ·b + (1 − τ)·g')``), as :func:`pipeoptim.runtime.predictors.sgd` at ``lr = 1``,
    written into one reused buffer per parameter (one to three passes, no allocation).
    Without momentum (no buffer to reuse) it is ``g'`` from that predictor."""
    buffers: dict[int, torch.Tensor] = {}
    generic = _at_unit_rate(sgd)

    def direction(param: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
        momentum, buf, grad = group.get("momentum", 0.0), state.get("momentum_buffer"), param.grad
        if not momentum or buf is None or grad is None:
            return generic(param, state, group)
        out = buffers.get(id(param))
        if out is None:
            out = buffers[id(param)] = torch.empty_like(buf)
        sign = -1.0 if group.get("maximize", False) else 1.0
        share, decay = 1.0 - group.get("dampening", 0.0), group.get("weight_decay", 0.0)
        if share * sign == 1.0:
            torch.add(grad, buf, alpha=momentum, out=out)
        else:
            torch.mul(buf, momentum, out=out).add_(grad, alpha=share * sign)
        if decay:
            out.add_(param.detach(), alpha=share * decay)
        if group.get("nesterov", False):
            out.mul_(momentum).add_(grad, alpha=sign)
            if decay:
                out.add_(param.detach(), alpha=decay)
        return out

    return direction


class Extrapolator:
    """``Ŵ = W − c_g · D`` for a stage's parameters, D cached between optimizer steps.

    Args:
        params: the stage's trainable parameters by graph name.
        optimizer: the stage's optimizer (its state and groups are read at each prediction).
        direction: D of one parameter from its state and group (``None``: no prediction).
    """

    def __init__(self, params: dict[str, nn.Parameter], optimizer: Optimizer, direction: Direction) -> None:
        self.params = params
        self.optimizer = optimizer
        self.direction = direction
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.groups: list[list[str]] = [[] for _ in optimizer.param_groups]
        for name, p in params.items():
            self.groups[group_of[id(p)]].append(name)
        self._directions: dict[str, torch.Tensor] | None = None

    def invalidate(self) -> None:
        """Forget D (the optimizer stepped, or a backward is about to change the gradients)."""
        self._directions = None

    def directions(self) -> dict[str, torch.Tensor]:
        """D of every parameter that has one, computed once until :meth:`invalidate`."""
        if self._directions is None:
            directions = {}
            with torch.no_grad():
                for index, names in enumerate(self.groups):
                    group = self.optimizer.param_groups[index]
                    for name in names:
                        p = self.params[name]
                        d = self.direction(p, self.optimizer.state.get(p, {}), group)
                        if d is not None:
                            directions[name] = d
            self._directions = directions
        return self._directions

    @torch.no_grad()
    def predict(
        self, coefficients: Sequence[float], into: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """``{name: W − c_g · D}`` for the parameters with a direction and ``c_g ≠ 0``.

        Args:
            coefficients: c per optimizer group (PipeOptim: the sum of the learning rates of
                the steps to come; SpecTrain: steps × the current rate).
            into: tensors from an earlier call, overwritten with the new Ŵ (a parameter
                without one gets a new tensor).

        Returns:
            Ŵ by name, shaped like the parameters; parameters left out use W.
        """
        directions = self.directions()
        into = into or {}
        out: dict[str, torch.Tensor] = {}
        for names, c in zip(self.groups, coefficients):
            names = [n for n in names if n in directions] if c else []
            if not names:
                continue
            weights = [self.params[n].detach() for n in names]
            dirs = [directions[n] for n in names]
            hats = [into[n] if n in into else torch.empty_like(w) for n, w in zip(names, weights)]
            if weights[0].device.type == "cpu":
                for w, d, h in zip(weights, dirs, hats):
                    torch.add(w, d, alpha=-c, out=h)
            else:
                torch.ops.aten._foreach_add.List_out(weights, dirs, alpha=-c, out=hats)
            out.update(zip(names, hats))
        return out
