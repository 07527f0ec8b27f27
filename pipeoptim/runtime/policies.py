"""Weight policies: which weights a stage's forward and backward use under asynchronous 1F1B.

In asynchronous 1F1B a stage steps its optimizer between a micro-batch's forward and its
backward. A policy decides what the forward computes with and what the backward sees:

==============  =======================================  ====================================
policy          forward uses                             backward uses
==============  =======================================  ====================================
``none``        current weights W                        W as it is at backward time
``stash``       W (PipeDream)                            the version the forward used
``2bw``         W(t−1) for all of mini-batch t           the version the forward used
``spectrain``   W − s_f·lr·v (SpecTrain, v = momentum)   W − s_b·lr·v at backward time
``pipeoptim``   Ŵ = W − (Σ lr_i)·ΔW (PipeOptim)          W at backward time (no stash)
==============  =======================================  ====================================

A policy that gives the forward other weights swaps them in: for the forward only, each
parameter's ``.data`` is the chosen tensor (Ŵ, the shadow copy), and W again after it
(:meth:`WeightPolicy.saving <pipeoptim.runtime.weight_policy.WeightPolicy.saving>`). The stage
graph stays the model's, and the gradient reaches the parameter with no extra autograd node (a
straight-through call per parameter in the graph cost the forward and the backward of an MLP
stage about 10 % each, measured on the throughput benchmark).

The optimizer changes parameters in place between a forward and its backward, which would
trip autograd's saved-tensor version check. So the forward saves no weight:
``torch.autograd.graph.saved_tensors_hooks`` store a reference instead (a weight is found by
its storage, since ops often save a view such as ``w.t()``) and the backward rebuilds the view
from the weight the policy names (the current W, a stashed version, or a new prediction).
``pipeoptim`` with ``backward="predicted"`` keeps each micro-batch's Ŵ for its backward.
"""

from __future__ import annotations

from typing import Any

from pipeoptim.runtime.prediction import PipeOptimPolicy, SpecTrainPolicy
from pipeoptim.runtime.stashing import Stash, TwoBW
from pipeoptim.runtime.weight_policy import NoCorrection, WeightPolicy

POLICIES: dict[str, type[WeightPolicy]] = {
    "none": NoCorrection,
    "stash": Stash,
    "2bw": TwoBW,
    "spectrain": SpecTrainPolicy,
    "pipeoptim": PipeOptimPolicy,
}


def make_policy(name: str, **options: object) -> WeightPolicy:
    """Build the policy ``name`` (``none``, ``stash``, ``2bw``, ``spectrain``, ``pipeoptim``).

    Raises:
        ValueError: unknown name.
    """
    try:
        return POLICIES[name](**options)  # type: ignore[arg-type]
    except KeyError:
        raise ValueError(f"unknown weight policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def policy_options(policy: str | None, backward: str, predictor: str, micro_batches: int) -> dict[str, Any]:
    """Keyword arguments of the weight policy (:func:`make_policy`) of ``compile``'s options."""
    if policy == "pipeoptim":
        return {"backward": backward, "predictor": predictor}
    if policy == "2bw":
        return {"micro_batches": micro_batches}
    return {}
