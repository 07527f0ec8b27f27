"""A stage's copies of shared parameters, and the sum of their gradients over the holders.

A parameter that several stages read (tied embeddings; :mod:`pipeoptim.compiler.shared`) is
held by each of them: every holder owns a copy, computes its own part of the gradient, and
before an optimizer step the parts of all holders are summed (Megatron-LM's embedding group;
Narayanan et al., SC 2021). Every copy takes the same optimizer step with the same summed
gradient, so the copies stay identical.

**Rounds.** Each optimizer step of a holder is one round ``r`` (its ``r``-th step since the
pipeline was built): the holder posts its gradient parts of round ``r``, and the step applies
the sum of round ``r - D`` to its copies. The sum is an all-gather of the parts (a
``torch.distributed`` group of the holders, or memory in the local executor) added up in stage
order, so every holder and every executor gets the same bits.

- Methods that flush every mini-batch (GPipe, 1F1B): ``D = 0``. Round r is mini-batch r in
  every stage, the holders step together, and training equals the plain model.
- Asynchronous methods (PipeOptim, PipeDream, 2BW, SpecTrain, none): holder k steps mini-batch
  t right after its backward, and the first holder ``k_first`` has t's gradient only
  ``k - k_first`` mini-batches later. Waiting for it would flush the pipeline, so
  ``D = k_last - k_first`` (holders' stages): every copy applies mini-batch t's summed
  gradient at its own step of mini-batch ``t + D``, with that step's hyperparameters. The
  all-gather of round t is posted at step t and waited on only at step t + D, when the first
  holder has long posted it: no stage waits in the steady state. The first D steps after a
  flush apply no shared update; at a flush every holder applies the rounds still pending
  (:meth:`SharedParams.drain`), so after a flush the copies hold every mini-batch's update.

**Versions (asynchronous methods).** Each copy is one of its stage's weights: the stage's
weight policy predicts it (PipeOptim, SpecTrain) or stashes it (PipeDream, 2BW) with the
stage's own version difference, exactly like its other weights; what differs is that its
updates arrive D steps after those of the stage's other weights. All copies take the same
updates in the same order, so they are bit-identical after every flush.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim import Optimizer


class SharedExchange(Protocol):
    """How a holder posts its gradient parts of a round and collects every holder's."""

    def post_shared(self, round_: int, parts: list[torch.Tensor]) -> None: ...
    def collect_shared(self, round_: int) -> list[list[torch.Tensor]]: ...


class SharedParams:
    """Stage ``stage``'s copies of the shared parameters.

    Args:
        stage: this stage's index.
        names: every shared parameter of the model (qualified names), sorted; every holder
            sends one part per name, in this order.
        params: this stage's copies, ``{name: parameter}`` (a subset of ``names``).
        specs: ``(shape, dtype)`` of every name (a holder sends zeros for a name it lacks).
        first_holder: the first stage holding each name.
        holders: stages holding any shared parameter, sorted (the all-gather's group).
        delay: D (see the module's documentation).
        device: where this stage's tensors live.
    """

    def __init__(
        self,
        stage: int,
        names: Sequence[str],
        params: dict[str, nn.Parameter],
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
        first_holder: dict[str, int],
        holders: Sequence[int],
        delay: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.stage = stage
        self.names = list(names)
        self.params = params
        self.specs = specs
        self.first_holder = first_holder
        self.holders = list(holders)
        self.delay = delay
        self.device = torch.device(device)
        self.posted = 0
        self.applied = 0
        self._posted_now = False

    def outside_norm(self) -> set[int]:
        """ids of the copies this stage leaves out of the global gradient norm: all but the
        first holder's, so the norm counts each parameter once, as in the plain model."""
        return {id(p) for name, p in self.params.items() if self.first_holder[name] != self.stage}

    def parts(self) -> list[torch.Tensor]:
        """This stage's gradient of each name, flat, with one trailing element: 1 where the
        gradient exists, 0 (and zeros) where it does not or the stage holds no copy."""
        out = []
        for name in self.names:
            p = self.params.get(name)
            shape, dtype = self.specs[name]
            numel = int(torch.Size(shape).numel())
            flat = torch.zeros(numel + 1, dtype=dtype, device=self.device)
            if p is not None and p.grad is not None:
                flat[:numel] = p.grad.reshape(-1)
                flat[numel] = 1
            out.append(flat)
        return out

    def post(self, exchange: SharedExchange) -> None:
        """Post this step's round (once per step, however often it is called)."""
        if not self._posted_now:
            exchange.post_shared(self.posted, self.parts())
            self.posted += 1
            self._posted_now = True

    def due(self) -> int | None:
        """The round this step applies, ``None`` if none (the first D steps after a flush)."""
        return self.applied if self.applied <= self.posted - 1 - self.delay else None

    def set_grads(self, exchange: SharedExchange) -> None:
        """Before the optimizer step: post this round, and set every copy's gradient to the
        summed gradient of the due round (``None``, no update, where no round is due or no
        holder had a gradient)."""
        self.post(exchange)
        round_ = self.due()
        sums = self._sum(exchange.collect_shared(round_)) if round_ is not None else {}
        for name, p in self.params.items():
            p.grad = sums.get(name)
        if round_ is not None:
            self.applied += 1
        self._posted_now = False

    def drain(self, exchange: SharedExchange, optimizer: Optimizer) -> None:
        """At a flush: apply every posted round not yet applied, one optimizer step each on
        the copies only (the optimizer's other parameters, gradients and step hooks are not
        touched), with the hyperparameters of the copies' groups now."""
        while self.applied < self.posted:
            sums = self._sum(exchange.collect_shared(self.applied))
            self.applied += 1
            _step_only(optimizer, {self.params[n]: g for n, g in sums.items()})

    def _sum(self, gathered: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per name, the sum of the holders' parts in stage order (names without any gradient
        are left out)."""
        sums = {}
        for i, name in enumerate(self.names):
            if name not in self.params:
                continue
            parts = [holder[i] for holder in gathered]
            if not any(bool(part[-1]) for part in parts):
                continue
            total = parts[0][:-1].clone()
            for part in parts[1:]:
                total += part[:-1]
            sums[name] = total.reshape(self.params[name].shape).to(self.params[name].device)
        return sums


def _step_only(optimizer: Optimizer, grads: dict[nn.Parameter, torch.Tensor]) -> None:
    """One step of ``optimizer``'s update rule on the parameters in ``grads`` alone, with
    their groups' hyperparameters and their own optimizer state (updated in place)."""
    if not grads:
        return
    groups = []
    for group in optimizer.param_groups:
        chosen = [p for p in group["params"] if p in grads]
        if chosen:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": chosen})
    if not groups:
        return
    once: Any = type(optimizer)(groups, **_defaults(optimizer))
    for p, g in grads.items():
        once.state[p] = optimizer.state[p]  # the same dict: the step updates it in place
        p.grad = g
    once.step()
    for p in grads:
        optimizer.state[p] = once.state[p]


def _defaults(optimizer: Optimizer) -> dict[str, Any]:
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}


def finish_shared_grads(stages: Sequence[Any], channels: Sequence[Any], states: Sequence[Any]) -> None:
    """Set the summed gradient of every shared parameter (tied weights) on every stage of one
    process before a norm of the steps they take together is taken, as each rank does before
    the all-reduce: every holder's part posted first, then the sums set; ``states[k].grads_final``
    marks stage k done (its step does not set them again). The local executors took the norm
    when the first stage stepped, another holder's copy not summed yet (with 2 stages x 2
    replicas, a tied embedding's gradient was clipped 2.5% too much). The replicas' gradients
    must be summed already."""
    waiting = [k for k, state in enumerate(states) if not state.grads_final]
    for phase in ("post", "set_grads"):
        for k in waiting:
            if stages[k].shared is not None:
                getattr(stages[k].shared, phase)(channels[k])
    for k in waiting:
        states[k].grads_final = True
