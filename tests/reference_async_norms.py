"""An independent reference for global-norm clipping and float16 loss scaling in asynchronous
1F1B, written from the definition in the issue (no import of the library).

Stage k of N clips mini-batch t with ``Σ_{j≥k} ‖g_j(t)‖² + Σ_{j<k} ‖g_j(t')‖²``: the parts of
the stages after it travel back with t's gradients; those before it are the parts of the
newest mini-batch t' that stage 0 had stepped before its forward of the last micro-batch that
stage k forwarded before its step of t (they travel forward, stage to stage). t' is read off
a hand-built 1F1B timeline: stage k runs ``min(N − k − 1, total)`` warm-up forwards, then a
forward and a backward in turn, a step after every M-th backward, then the cool-down
backwards. With float16, stage k skips t iff some stage ``j ≥ k`` has a non-finite part in
t; stage 0 halves S after a non-finite mini-batch and doubles it after 2,000 finite ones.

:func:`grad_rule` plugs this into :func:`tests.reference_sim.simulate`, which decides the
weight versions of every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def timeline(num_stages: int, stage: int, mini_batches: int, micro_batches: int = 1) -> list[tuple[str, int]]:
    """Stage ``stage``'s actions over ``mini_batches`` mini-batches and the final flush:
    ``("F", micro-batch)``, ``("B", micro-batch)``, ``("S", mini-batch)``."""
    total = mini_batches * micro_batches
    warm = min(num_stages - stage - 1, total)
    actions = [("F", i) for i in range(warm)]
    for b, i in enumerate(range(warm, total + warm)):
        if i < total:
            actions.append(("F", i))
        actions.append(("B", b))
        if (b + 1) % micro_batches == 0:
            actions.append(("S", b // micro_batches))
    return actions


def older_sources(
    num_stages: int, mini_batches: int, micro_batches: int = 1
) -> dict[tuple[int, int], list[int]]:
    """``{(k, t): [u, ...]}``: the mini-batches stage 0 had stepped before its forward of the
    last micro-batch stage k forwarded before stepping t (t' is the newest of them that stage 0
    did not skip)."""
    stepped_before: dict[int, list[int]] = {}
    done: list[int] = []
    for op, i in timeline(num_stages, 0, mini_batches, micro_batches):
        if op == "F":
            stepped_before[i] = list(done)
        elif op == "S":
            done.append(i)
    out = {}
    for k in range(1, num_stages):
        last_forward = None
        for op, i in timeline(num_stages, k, mini_batches, micro_batches):
            if op == "F":
                last_forward = i
            elif op == "S":
                out[(k, i)] = stepped_before[last_forward] if last_forward is not None else []
    return out


class Recorder:
    """What the reference found: each stage's skipped mini-batches and stage 0's loss scales."""

    def __init__(self) -> None:
        self.skipped: dict[int, list[int]] = {}
        self.scale = 2.0**16
        self.scales: list[float] = []


def grad_rule(
    stage_of_param: list[int],
    num_stages: int,
    mini_batches: int,
    micro_batches: int = 1,
    max_norm: float | None = None,
    float16: bool = False,
    inject: dict[int, int] | None = None,
    record: Recorder | None = None,
    older: bool = True,
) -> Callable[[int, list[torch.Tensor]], list[torch.Tensor | None]]:
    """The rule for :func:`tests.reference_sim.simulate`.

    Args:
        stage_of_param: stage of each parameter (``[W0, b0, W1, b1, ...]``).
        inject: ``{mini-batch: parameter}``: that parameter's gradient is +inf in that mini-batch.
        older: add the earlier stages' parts (False: a deliberately wrong rule, for the tests).
    """
    sources = older_sources(num_stages, mini_batches, micro_batches)
    parts_of: dict[int, list[float]] = {}  # mini-batches stage 0 stepped (all parts finite)
    record = record if record is not None else Recorder()
    growth = 0

    def rule(t: int, grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        nonlocal growth
        grads = list(grads)
        if inject and t in inject:
            grads[inject[t]] = torch.full_like(grads[inject[t]], math.inf)
        parts = [0.0] * num_stages
        for g, k in zip(grads, stage_of_param):
            parts[k] += float((g.double() * g.double()).sum())
        out: list[torch.Tensor | None] = []
        for g, k in zip(grads, stage_of_param):
            known = sum(parts[k:])
            if float16 and not math.isfinite(known):
                out.append(None)
                if k not in record.skipped.setdefault(t, []):
                    record.skipped[t].append(k)
                continue
            if max_norm is not None:
                stepped = [u for u in sources.get((k, t), []) if u in parts_of]
                if older and stepped:
                    known += sum(parts_of[max(stepped)][:k])
                g = g * min(1.0, max_norm / (math.sqrt(known) + 1e-6))
            out.append(g)
        total = sum(parts)
        if math.isfinite(total):
            parts_of[t] = parts
        if float16:
            if not math.isfinite(total):
                record.scale, growth = record.scale * 0.5, 0
            else:
                growth += 1
                if growth == 2000:
                    record.scale, growth = record.scale * 2.0, 0
            record.scales.append(record.scale)
        return out

    return rule
