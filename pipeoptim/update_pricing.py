"""The optimizer's update costs of a layout's ranks, as the plan's cost model takes them.

A pipeline's ranks on one CPU step their weights at about the same time and share the memory
bandwidth and caches, so a layout's step, prediction and copy costs per byte depend on how many
of its ranks run beside each other (:func:`pipeoptim.runtime.linkcost.ranks_beside`):
:class:`UpdatePricing` times them once per such count (cached in the profile folder,
:func:`pipeoptim.update_cost_cache.load_or_measure_update_cost`) and puts them into each layout's
:class:`pipeoptim.compiler.costmodel.CostConfig`, so that a layout searched among others and
the same layout compiled alone are priced alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.runtime.linkcost import ranks_beside
from pipeoptim.update_cost import UpdateCostError, UpdateCosts, working_set_of
from pipeoptim.update_cost_cache import load_or_measure_update_cost

NOT_MODELLED = UpdateCosts(0.0, 0.0, 0.0, 0.0)


def passes_over_gradients(max_grad_norm: float | None, autocast: torch.dtype | None) -> bool:
    """Whether the stages pass over their gradients before each step, taking their norm and
    scaling them: clipping (``max_grad_norm``) and float16's loss scaling (its check for
    infinities and its unscaling) do (:func:`pipeoptim.runtime.scaler.step_together`)."""
    return max_grad_norm is not None or autocast is torch.float16


class UpdatePricing:
    """``pricing(config)``: ``config`` with the update costs of its ``num_stages ×
    data_parallel`` ranks. Call it where the stages' torch threads are set (within
    :func:`pipeoptim.runtime.linkcost.stage_threads`), as the costs are timed so.

    Args:
        optimizer_class, defaults: the optimizer (its ``torch.optim`` base is timed).
        device: where the stages run.
        elements: ``(numel, tensors)`` of the working set timed
            (:func:`pipeoptim.update_cost.working_set`).
        profile_dir: the cache folder (``None``: measured on every call).
        say: gets a line where the costs cannot be measured (then they are 0: not modelled).
        clipping: the stages pass over their gradients before each step, taking their norm
            and scaling them: clipping (``max_grad_norm``) or float16's loss scaling (its
            check for infinities and its unscaling); the step is priced with one such pass
            (with both, the second scaling is not priced).
    """

    def __init__(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        defaults: Mapping[str, Any],
        device: torch.device,
        elements: tuple[int, int],
        profile_dir: str | Path | None,
        say: Callable[[str], None],
        clipping: bool = False,
    ) -> None:
        self.optimizer_class, self.defaults, self.device = optimizer_class, defaults, device
        self.elements, self.profile_dir, self.say = elements, profile_dir, say
        self.clipping = clipping
        self.by_beside: dict[int, UpdateCosts] = {}
        self.failed = False

    @classmethod
    def of(
        cls,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        profile_dir: str | Path | None,
        say: Callable[[str], None],
        clipping: bool = False,
    ) -> UpdatePricing:
        """The pricing of ``optimizer``'s class and defaults on a working set like its parameters."""
        params: Iterable[torch.Tensor] = (p for g in optimizer.param_groups for p in g["params"])
        elements = working_set_of(params, device)
        return cls(type(optimizer), optimizer.defaults, device, elements, profile_dir, say, clipping)

    def costs(self, ranks: int) -> UpdateCosts:
        """Step, prediction and copy seconds per byte of one of ``ranks`` ranks (0 each, said,
        where the optimizer cannot be timed)."""
        beside = ranks_beside(ranks, self.device)
        if self.failed:
            return NOT_MODELLED
        if beside not in self.by_beside:
            try:
                self.by_beside[beside] = load_or_measure_update_cost(
                    self.optimizer_class,
                    self.defaults,
                    self.device,
                    profile_dir=self.profile_dir,
                    log=self.say,
                    elements=self.elements,
                    beside=beside,
                )
            except UpdateCostError as exc:
                self.say(f"optimizer step cost not modelled in the plan: {exc}")
                self.failed = True
                return NOT_MODELLED
        return self.by_beside[beside]

    def __call__(self, config: CostConfig) -> CostConfig:
        costs = self.costs(config.num_stages * config.data_parallel)
        step = costs.step + (costs.clip if self.clipping else 0.0)  # a clipping before every step
        return dataclasses.replace(
            config, step_s_per_byte=step, predict_s_per_byte=costs.predict, copy_s_per_byte=costs.copy
        )
