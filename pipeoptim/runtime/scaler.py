"""Loss scaling for float16 (``compile(..., autocast=torch.float16)``), over all stages.

float16 gradients underflow to zero below about 6e-8; dynamic loss scaling (Micikevicius et
al., "Mixed Precision Training", ICLR 2018, Sec. 3.2) multiplies the loss by a scale S so
that the backward runs on ``S·g``, and the optimizer steps on ``g`` again. The rule is
``torch.amp.GradScaler``'s, with its defaults:

- the last stage multiplies each micro-batch's loss by S;
- before the step every stage unscales its gradients (``g ← g / S``) and computes its share
  ``Σ‖g_k‖²`` of the squared global norm; the stages add them up (the all-reduce that
  global-norm clipping uses, :mod:`pipeoptim.runtime.clipping`), so the sum is infinite or NaN
  exactly when some stage found an inf or NaN gradient;
- then, on every stage alike: if the sum is not finite the optimizer step is skipped and
  ``S ← S · 0.5``; otherwise the step is taken (after clipping, if asked) and after 2,000
  steps in a row without an inf ``S ← S · 2``.

Every stage keeps its own copy of S and updates it from the same all-reduced sum, so the
copies stay equal. Hence gpipe and 1f1b with float16 train exactly as the plain model with
``torch.autocast("cpu", torch.float16)`` and ``torch.amp.GradScaler``. The asynchronous
methods, whose stages step a mini-batch at different times, carry S and the inf check with
their messages instead (:mod:`pipeoptim.runtime.async_norms`): a stage skips a mini-batch
when it or a later stage found an inf or NaN in it, and stage 0 alone updates S.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeoptim.runtime.clipping import scale_grads_


@dataclass
class LossScaler:
    """One stage's copy of the dynamic loss scale (``torch.amp.GradScaler``'s defaults).

    Attributes:
        scale: S, the factor on the loss.
        growth_factor: S is multiplied by it after ``growth_interval`` finite steps in a row.
        backoff_factor: S is multiplied by it after a step with an inf or NaN gradient.
        growth_interval: finite steps in a row before S grows.
        growth_tracker: finite steps in a row so far.
    """

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    growth_tracker: int = 0

    def update(self, total_squared: float) -> bool:
        """Update S from the all-reduced ``Σ‖g_k‖²`` of the unscaled gradients; returns
        whether the step is taken (False: some stage had an inf or NaN gradient)."""
        finite = math.isfinite(total_squared)
        if not finite:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0
        return finite


class SteppingStage(Protocol):
    """What :func:`step_together` needs of a stage (:class:`pipeoptim.runtime.stage.StageRuntime`)."""

    scaler: LossScaler | None
    max_grad_norm: float | None

    def squared_grad_norm(self) -> float: ...
    def trainable(self) -> list[torch.Tensor]: ...
    def clip_gradients(self, total_squared: float) -> None: ...
    def step(self, micro_batch: int | None = None, skip: bool = False) -> None: ...


def norm_share(stage: SteppingStage) -> float:
    """Stage's share ``Σ‖g_k‖²`` of the squared global norm, of the unscaled gradients (its
    gradients are still scaled by S: the share is divided by S², exact for a power of two)."""
    share = stage.squared_grad_norm()
    return share / stage.scaler.scale**2 if stage.scaler is not None else share


def step_together(stage: SteppingStage, total_of: Callable[[float], float], micro_batch: int | None) -> None:
    """The optimizer step of a stage that steps together with all others (global-norm
    clipping, loss scaling), its gradients already summed over the replicas (data parallelism,
    :func:`pipeoptim.runtime.executor.run_action`): all-reduce the squared norm (``total_of``),
    unscale, skip the step on an inf or NaN anywhere, else clip and step."""
    total = total_of(norm_share(stage))
    take = True
    if stage.scaler is not None:
        scale_grads_(stage.trainable(), 1.0 / stage.scaler.scale)
        take = stage.scaler.update(total)
    if take and stage.max_grad_norm is not None:
        stage.clip_gradients(total)
    stage.step(micro_batch, skip=not take)
