"""Gradient-norm clipping by the global norm over all stages (``compile(..., max_grad_norm=)``).

The rule is ``torch.nn.utils.clip_grad_norm_``'s (Pascanu et al., ICML 2013, Eq. 5; norm 2):
with ``g`` the gradients of every parameter of the model for one mini-batch,

    ‖g‖ = sqrt(Σ_k ‖g_k‖²),    g ← g · min(1, max_norm / (‖g‖ + 1e-6)),

where ``‖g_k‖²`` is the sum of squares of stage k's gradients (each parameter lives in exactly
one stage). Before its optimizer step each stage computes ``‖g_k‖²``, the stages add them up
(``torch.distributed.all_reduce``, or in memory in the local executor) and each scales its own
gradients by the same factor.

For GPipe and 1F1B (a flush per mini-batch) the global norm of a mini-batch is that of its
own gradients at every stage: one small all-reduce at the step that all stages take together
anyway, and training equals plain training with ``clip_grad_norm_``. With data parallelism
(:mod:`pipeoptim.runtime.replicas`) ``g_k`` is the replica-averaged gradient, after the
replicas' all-reduce, so every replica clips by the same norm.

The asynchronous methods (PipeOptim, PipeDream, 2BW, SpecTrain, none) step a mini-batch at
different times on different stages; there the norm is the one defined in
:mod:`pipeoptim.runtime.async_norms` (exact at stage 0, the newest known parts of the earlier
stages elsewhere), computed without a stall.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def squared_grad_norm(params: Iterable[torch.Tensor]) -> float:
    """Σ ‖p.grad‖² over ``params`` with a gradient (float64 accumulation; 0.0 if none).
    ``clip_grad_norm_`` takes the float32 norm of the per-parameter float32 norms instead: the
    clip factors differ in their last bits (about 1e-7), which float16 autocast with Adam
    amplified to 5.6e-5 in the loss over 10 steps against plain training."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(torch.linalg.vector_norm(p.grad, dtype=torch.float64) ** 2)
    return total


def clip_coefficient(total_squared: float, max_norm: float) -> float:
    """``min(1, max_norm / (sqrt(total_squared) + 1e-6))``, as ``clip_grad_norm_`` (a NaN or
    infinite norm gives a NaN or zero factor, as there with ``error_if_nonfinite=False``)."""
    if math.isnan(total_squared):
        return math.nan
    return min(1.0, max_norm / (math.sqrt(total_squared) + 1e-6))


def scale_grads_(params: Iterable[torch.Tensor], factor: float) -> None:
    """Multiply every existing gradient of ``params`` by ``factor`` in place (skipped at 1.0)."""
    if factor == 1.0:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


def check_clipping(value: float | None) -> float | None:
    """``value`` (``max_grad_norm``) as a float, checked.

    Raises:
        ValueError: not a positive finite number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"max_grad_norm must be a positive finite number (e.g. 1.0), got {value!r}")
    return float(value)
