"""Node times scaled to what the whole model takes, run as one forward and one backward.

The profiler times each node alone, many times in a row (:mod:`pipeoptim.compiler.profile`):
the node's weights and inputs then sit in the core's caches, which they do not when the stage
runs its nodes one after the other. On the benchmark MLP (16 linear layers of 512, 64 rows,
one CPU thread) the node medians added up to 6.4 ms forward and 13.1 ms backward while the
model itself took 10.8 ms and 20.5 ms, so every plan predicted about 1.6x the throughput the
pipeline reached. :func:`calibrate` keeps each node's share of the measured time and scales
the forward and the backward times so that they add up to the whole model's medians
(:func:`whole_model_seconds`, timed like the nodes).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from pipeoptim.compiler.costgraph import CostNode

Timer = Callable[[Callable[[], Any]], float]


def whole_model_seconds(
    gm: fx.GraphModule, inputs: Sequence[torch.Tensor], timer: Timer, repeats: int
) -> tuple[float, float]:
    """Median seconds of ``gm``'s forward on ``inputs`` and of the backward from its outputs
    (a gradient of ones for each output that requires one), over ``repeats`` runs."""
    fwd, bwd = [], []
    for _ in range(repeats):
        box: list[Any] = []
        fwd.append(timer(lambda box=box: box.append(gm(*inputs))))
        out = [t for t in pytree.tree_leaves(box[0]) if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = [torch.ones_like(t) for t in out]
        bwd.append(timer(lambda out=out, grads=grads: torch.autograd.backward(out, grads)) if out else 0.0)
    gm.zero_grad(set_to_none=True)
    return statistics.median(fwd), statistics.median(bwd)


def calibrate(nodes: Sequence[CostNode], forward_s: float, backward_s: float) -> dict[str, float]:
    """Scale the nodes' ``fwd_s`` to add up to ``forward_s`` and their ``bwd_s`` to
    ``backward_s`` (seconds), in place; returns the factors and the totals (a factor is 1.0
    where the nodes' times add up to nothing)."""
    factors = {}
    for field, whole in (("fwd_s", forward_s), ("bwd_s", backward_s)):
        total = sum(getattr(n, field) for n in nodes)
        factor = whole / total if total > 0 and whole > 0 else 1.0
        for n in nodes:
            setattr(n, field, getattr(n, field) * factor)
        factors[field] = factor
    return {
        "forward_factor": factors["fwd_s"],
        "backward_factor": factors["bwd_s"],
        "forward_s": forward_s,
        "backward_s": backward_s,
    }
