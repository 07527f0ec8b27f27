"""Predicted weights at a low cost per forward: ΔW once per optimizer step, Ŵ into reused buffers.

PipeOptim (Guan et al., arXiv:2312.00839) predicts ``Ŵ = W − lr · s · ΔW`` and SpecTrain
(Chen et al., arXiv:1809.02839) ``Ŵ = W − s · lr · v``; both are ``Ŵ = W − c · D`` with
a direction D that changes only when the optimizer steps (or a backward brings a new gradient)
and a coefficient c that a stage knows when it predicts (``c = Σ lr_i`` over the s steps in
between, :mod:`pipeoptim.runtime.policies`). :class:`Extrapolator` therefore finds D once,
reuses it for every prediction until :meth:`Extrapolator.invalidate` (called by the policies
after each step and before each backward), and writes Ŵ into buffers the caller passes back
each time: no allocation follows the first prediction. Parameters without a direction (no
optimizer state yet) or with ``c = 0`` get no Ŵ: the forward uses W itself.

D is kept as a linear combination of tensors the optimizer already holds, ``D = Σ a_j·T_j``
(:data:`Terms`; SGD: ``μ·b + g + λ·W``), so that SGD's D is never written out:
``Ŵ = W − c·a_1·T_1 − c·a_2·T_2 …`` is one ``torch.add(W, T_1, alpha=−c·a_1, out=Ŵ)`` and an
in-place ``add_`` per further term. On the CPU these run parameter by parameter, so that Ŵ
is still in cache for each ``add_`` (a third less time than writing D out and reading it back,
measured on the throughput benchmark's 1 MiB weights); on accelerators each term is one
multi-tensor op over the parameters with the same coefficients (``torch._foreach_add``),
following ``torch.optim``'s own rule (``foreach`` by default only on CUDA: on the CPU the
multi-tensor kernels run as per-tensor loops, measured slower here). With ``torch.optim.SGD``
on the CPU, PipeOptim predicts each parameter's Ŵ inside the step, right after the parameter
is updated (:meth:`Extrapolator.predict_one`, :mod:`pipeoptim.runtime.fused_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from pipeoptim.runtime.pieces import Cut, FlatPieces, PiecePlan
from pipeoptim.runtime.predictors import sgd
from pipeoptim.runtime.timed_choice import TimedChoice

#: ``D = Σ a_j · T_j``: coefficients and tensors shaped like the parameter.
Terms = list[tuple[float, torch.Tensor]]

#: ``direction(param, state, group) -> D`` (the update per unit learning rate) or ``None``.
Direction = Callable[[torch.Tensor, dict, dict], "Terms | None"]


def per_unit_rate(predictor: Callable[[torch.Tensor, dict, dict], torch.Tensor | None]) -> Direction:
    """The direction ``ΔW = U / lr`` of a predictor returning the update ``U = lr · ΔW``
    (:mod:`pipeoptim.runtime.predictors`): the predictor at ``lr = 1``; for SGD,
    :func:`sgd_direction` (the same ΔW, as terms of the optimizer's own tensors)."""
    return sgd_direction if predictor is sgd else _at_unit_rate(predictor)


def _at_unit_rate(predictor: Callable[[torch.Tensor, dict, dict], torch.Tensor | None]) -> Direction:
    def direction(param: torch.Tensor, state: dict, group: dict) -> Terms | None:
        update = predictor(param, state, {**group, "lr": 1.0})
        return None if update is None else [(1.0, update)]

    return direction


def sgd_direction(param: torch.Tensor, state: dict, group: dict) -> Terms | None:
    """PipeOptim's ΔW for ``torch.optim.SGD`` with momentum μ, dampening τ, weight decay λ:
    the next step's momentum buffer ``μ·b + (1 − τ)·g'`` with ``g' = ±g + λ·W`` (Nesterov:
    ``g' + μ·(μ·b + (1 − τ)·g')``), as :func:`pipeoptim.runtime.predictors.sgd` at ``lr = 1``,
    as terms of b, g and W (nothing is computed here). Without momentum or before the first
    step it is the predictor's own tensor."""
    momentum, buf, grad = group.get("momentum", 0.0), state.get("momentum_buffer"), param.grad
    if not momentum or buf is None or grad is None:
        return _at_unit_rate(sgd)(param, state, group)
    sign = -1.0 if group.get("maximize", False) else 1.0
    share, decay = 1.0 - group.get("dampening", 0.0), group.get("weight_decay", 0.0)
    # μ·b + τ'·(±g + λ·W), Nesterov: μ²·b + (1 + μ·τ')·(±g + λ·W), with τ' = 1 − τ
    nesterov = group.get("nesterov", False)
    on_grad = 1.0 + momentum * share if nesterov else share
    on_buf = momentum * momentum if nesterov else momentum
    terms = [(on_buf, buf), (on_grad * sign, grad)]
    if decay:
        terms.append((on_grad * decay, param.detach()))
    return terms


def extrapolate(weight: torch.Tensor, terms: Terms, c: float, out: torch.Tensor) -> torch.Tensor:
    """``out = W − c · Σ a_j·T_j``: one ``torch.add`` and an in-place ``add_`` per further term."""
    (a, first), *rest = terms
    torch.add(weight, first, alpha=-c * a, out=out)
    for a, t in rest:
        out.add_(t, alpha=-c * a)
    return out


def reusable(into: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """``into`` where it can hold Ŵ of ``weight`` (same shape, dtype and device; the same
    strides, or contiguous), else a new tensor like ``weight``: a Ŵ buffer from an earlier step
    no longer fits once the parameter's ``.data`` was replaced by a tensor of another shape or
    layout (pieces of Ŵ are views of a contiguous buffer)."""
    if (
        into is not None
        and into.shape == weight.shape
        and into.dtype == weight.dtype
        and into.device == weight.device
        and (into.stride() == weight.stride() or into.is_contiguous())
    ):
        return into
    return torch.empty_like(weight)


def hyperparameters(group: dict) -> tuple:
    """A group's settings other than its parameters and rate, as plain values (a tensor's by
    its numbers), to compare with ``==``."""

    def plain(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return tuple(value.detach().reshape(-1).tolist())
        if isinstance(value, (tuple, list)):
            return tuple(plain(v) for v in value)
        return value

    return tuple((key, plain(value)) for key, value in group.items() if key not in ("params", "lr"))


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
        for name, p in params.items():  # one the optimizer does not hold never moves: no Ŵ
            if id(p) in group_of:
                self.groups[group_of[id(p)]].append(name)
        self.name_of = {id(params[name]): name for names in self.groups for name in names}
        self._directions: dict[str, Terms] | None = None
        self._read_with: tuple | None = None  # the groups' hyperparameters D was found with
        #: pieces of the weights, momentum buffers and Ŵ buffers, kept between steps
        self.pieces = FlatPieces()
        #: whether the SGD step with the prediction in it steps large parameters in pieces
        #: (:func:`pipeoptim.runtime.fused_step.step_predicting`): the faster way on this
        #: host, timed over the first steps
        self.piecewise = TimedChoice((True, False), warmup=1)

    def invalidate(self) -> None:
        """Forget D (the optimizer stepped, or a backward is about to change the gradients)."""
        self._directions = None

    def directions(self) -> dict[str, Terms]:
        """D of every parameter that has one, as terms, found once until :meth:`invalidate`
        or until a group's hyperparameters other than the rate change (a schedule's momentum
        or betas: the warm-up forwards after a flush predict with no step in between, each
        with its own mini-batch's)."""
        read_with = tuple(hyperparameters(g) for g in self.optimizer.param_groups)
        if self._directions is None or read_with != self._read_with:
            self._read_with = read_with
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

    def predict_one(self, name: str, group: dict, c: float, into: torch.Tensor | None) -> torch.Tensor | None:
        """Ŵ of one parameter (``group`` its optimizer group), into ``into`` when given; ``None``
        where it has no direction or ``c = 0`` (the forward uses W). The same arithmetic as
        :meth:`predict`, from the state as it stands (no cached D). Call under
        ``torch.no_grad()``."""
        p = self.params[name]
        terms = self.direction(p, self.optimizer.state.get(p, {}), group) if c else None
        if terms is None:
            return None
        return extrapolate(p.detach(), terms, c, reusable(into, p))

    def piece_plan(
        self, name: str, group: dict, c: float, into: torch.Tensor | None, cut: Cut
    ) -> tuple[torch.Tensor, PiecePlan] | None:
        """:meth:`predict_one` piece by piece, for a parameter that
        :func:`pipeoptim.runtime.fused_step.sgd_step_each` steps in pieces: Ŵ (``into`` where
        given) and the :class:`pipeoptim.runtime.pieces.PiecePlan` that writes it from the
        pieces of ``cut`` (weights, momentum buffer and gradient) and of D's other tensors;
        ``None`` where the parameter has no direction or ``c = 0``. The parameter is
        contiguous. The same kernels as :func:`extrapolate` on each piece (element-wise,
        on the same elements: the same bits)."""
        p = self.params[name]
        terms = self.direction(p, self.optimizer.state.get(p, {}), group) if c else None
        if terms is None:
            return None
        out = reusable(into, p)
        size = cut[0][1][0].numel()
        known = {(t.data_ptr(), t.numel()): pieces for t, pieces in cut}

        def pieces_of(t: torch.Tensor) -> Sequence[torch.Tensor]:
            return known.get((t.data_ptr(), t.numel())) or t.detach().reshape(-1).split(size)

        (alpha, first), *rest = [(-c * a, pieces_of(t)) for a, t in terms]
        return out, PiecePlan(self.pieces.of(out, size), alpha, first, rest)

    @torch.no_grad()
    def predict(
        self, coefficients: Sequence[float], into: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """``{name: W − c_g · D}`` for the parameters with a direction and ``c_g ≠ 0``.

        Args:
            coefficients: c per optimizer group (PipeOptim: the sum of the learning rates of
                the steps to come; SpecTrain: steps × the current rate).
            into: tensors from an earlier call, overwritten with the new Ŵ (a parameter
                without one, or whose one no longer fits it, gets a new tensor).

        Returns:
            Ŵ by name, shaped like the parameters; parameters left out use W.
        """
        directions = self.directions()
        into = into or {}
        out: dict[str, torch.Tensor] = {}
        for names, c in zip(self.groups, coefficients):
            buckets: dict[tuple[float, ...], list[str]] = {}  # same coefficients: one foreach op per term
            for name in names if c else []:
                if name in directions:
                    buckets.setdefault(tuple(a for a, _ in directions[name]), []).append(name)
            for scales, members in buckets.items():
                weights = [self.params[n].detach() for n in members]
                hats = [reusable(into.get(n), w) for n, w in zip(members, weights)]
                if weights[0].device.type == "cpu":
                    # last parameter first: the optimizer step that just ran ended with it,
                    # so its weights and state are the likeliest still in cache
                    for name, w, h in reversed(list(zip(members, weights, hats))):
                        extrapolate(w, directions[name], c, h)
                else:
                    first = [directions[n][0][1] for n in members]
                    torch.ops.aten._foreach_add.List_out(weights, first, alpha=-c * scales[0], out=hats)
                    for j, a in enumerate(scales[1:], start=1):
                        torch._foreach_add_(hats, [directions[n][j][1] for n in members], alpha=-c * a)
                out.update(zip(members, hats))
        return out
