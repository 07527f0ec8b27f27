"""Global-norm clipping and float16 loss scaling for asynchronous 1F1B, without a stall.

In asynchronous 1F1B (PipeOptim, PipeDream, 2BW, SpecTrain, none) stage k of N steps
mini-batch t right after its own backward of t, while the stages before it compute t's
gradient later (stage 0 last). The exact global norm of t (Pascanu et al., ICML 2013, Eq. 5)
is known only at stage 0; waiting for it at every stage would flush the pipeline every
mini-batch. Here each stage uses what reaches it without waiting.

**Backward sum (exact part).** The backward messages of t run from stage N−1 to 0, so each
stage adds its own squared gradient norm ``‖g_k(t)‖²`` (of the unscaled gradient, float64) to
the parts it received and sends them on with its input gradient of t's last micro-batch
(a note of N + 2 float64 values, :func:`note_size`). Stage k therefore knows
``‖g_j(t)‖²`` for every ``j ≥ k`` when it steps t; stage 0 knows every stage's part.

**Forward relay (older part).** Stage 0 piggybacks on each forward message the parts of the
newest mini-batch u it has stepped (a taken step: every part finite) and its loss scale S;
every stage relays, with its forward of micro-batch m, what came with its input of m. Stage
k clips the gradient of t with

    ‖g‖²_k(t) = Σ_{j≥k} ‖g_j(t)‖² + Σ_{j<k} ‖g_j(t')‖²,
    g_k ← g_k · min(1, max_norm / (‖g‖_k(t) + 1e-6)),

where t' is the mini-batch whose parts came with the last forward stage k ran before its
step of t: the newest mini-batch u that stage 0 had stepped (and not skipped) before its
forward of that micro-batch. In the steady state of 1F1B with one micro-batch per mini-batch
(stage k runs ``F(t+N−k−1) B(t) S(t)``; stage 0 runs ``F(m)`` after ``S(m−N)``) this is
``t' = t − k − 1``; in the cool-down of a flush, after the last forward ``F(T−1)``,
``t' = T − 1 − N``; with M micro-batches per mini-batch (PipeDream-2BW) it is read off the
micro-batch timeline the same way. Before any part has reached stage k (the first k + 1
mini-batches) only the known part ``Σ_{j≥k}`` is used. Stage 0 clips with the exact global
norm of t; with one stage this is ``torch.nn.utils.clip_grad_norm_``. The rule depends only on
each stage's own action order, so the local, processes and torchrun executors compute the
same numbers.

**float16 (dynamic loss scaling, Micikevicius et al., ICLR 2018, Sec. 3.2).** The last stage
multiplies every micro-batch loss of t by S(t), the scale that came with the forward of t's
first micro-batch (stage 0's S when it forwarded it), and S(t) travels back with the
gradients; every stage unscales t's gradient by S(t) (exact for a power of two). An inf or
NaN rides the backward sum (its part is not finite), so stage k skips its step of t iff some
stage ``j ≥ k`` found an inf or NaN in t's gradient; stage 0 knows all and skips iff any stage
did. A stage ``j < k`` that alone overflows therefore skips its own step only: stages after
it have already stepped t. Stage 0 alone updates S (``torch.amp.GradScaler``'s rule: halve
after a non-finite gradient, double after 2,000 finite steps in a row, :class:`LossScaler`),
from exact information, and the new S reaches the last stage with the forward messages. After
a skipped step a stage drops its gradient, so a weight predictor reads none (as before the
first step) rather than an inf.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from pipeoptim.runtime.clipping import clip_coefficient, scale_grads_
from pipeoptim.runtime.scaler import LossScaler


def note_size(num_stages: int) -> int:
    """float64 values of one note: mini-batch index, loss scale S, one part per stage."""
    return num_stages + 2


class NormStage(Protocol):
    """What :class:`AsyncNorms` needs of a stage (:class:`pipeoptim.runtime.stage.StageRuntime`)."""

    index: int
    num_stages: int
    max_grad_norm: float | None
    scaler: LossScaler | None

    def squared_grad_norm(self) -> float: ...
    def trainable(self) -> list[torch.Tensor]: ...


class AsyncNorms:
    """One stage's share of asynchronous global-norm clipping and loss scaling (see the module
    documentation).

    Args:
        index: k, this stage.
        num_stages: N.
        micro_batches: M, micro-batches per mini-batch (micro-batch m belongs to mini-batch
            ``m // M``; the step of t follows the backward of micro-batch ``t·M + M − 1``).
    """

    def __init__(self, index: int, num_stages: int, micro_batches: int) -> None:
        self.index = index
        self.num_stages = num_stages
        self.micro_batches = micro_batches
        #: (u, parts of u) of the newest fully stepped mini-batch known here, or ``None``
        self.known: tuple[int, torch.Tensor] | None = None
        #: S as stage 0 had it at the forward of the micro-batch this stage forwarded last
        self.scale = 1.0
        self._scale_of: dict[int, float] = {}  # last stage: S(t) of each mini-batch in flight
        self._sums: dict[int, tuple[float, torch.Tensor]] = {}  # S(t), parts j >= k of t

    def _mini_batch(self, micro_batch: int) -> int:
        return micro_batch // self.micro_batches

    def forward_note(self) -> torch.Tensor:
        """What this stage sends on with its activations: ``[u, S, parts of u]`` (u = −1 and
        zero parts when no mini-batch is known yet)."""
        note = torch.zeros(note_size(self.num_stages), dtype=torch.float64)
        note[1] = self.scale
        if self.known is None:
            note[0] = -1
        else:
            note[0] = self.known[0]
            note[2:] = self.known[1]
        return note

    def before_forward(self, stage: NormStage, micro_batch: int, note: torch.Tensor | None) -> None:
        """Take in the note that came with the inputs of ``micro_batch`` (``None`` at stage 0,
        which reads its own S); the last stage sets the loss scale of the micro-batch's
        mini-batch."""
        scaler = stage.scaler
        if note is None:
            self.scale = scaler.scale if scaler is not None else 1.0
        else:
            self.scale = float(note[1])
            if note[0] >= 0:
                self.known = (int(note[0]), note[2:].clone())
        if self.index == self.num_stages - 1:
            t = self._mini_batch(micro_batch)
            scale = self._scale_of.setdefault(t, self.scale)
            if scaler is not None and self.index > 0:
                scaler.scale = scale  # the loss factor of this forward

    def after_backward(self, stage: NormStage, micro_batch: int, note: torch.Tensor | None) -> torch.Tensor:
        """Add this stage's part once the backward of ``micro_batch`` completes its mini-batch;
        returns the note to send back with the input gradients (``[t, S(t), parts]``).

        Args:
            note: the note that came with the gradients of ``micro_batch`` (``None`` at the
                last stage).
        """
        t = self._mini_batch(micro_batch)
        if note is None:
            closing = micro_batch % self.micro_batches == self.micro_batches - 1
            scale = self._scale_of.pop(t) if closing else self._scale_of[t]
            parts = torch.zeros(self.num_stages, dtype=torch.float64)
        else:
            scale, parts = float(note[1]), note[2:].clone()
        if micro_batch % self.micro_batches == self.micro_batches - 1:
            parts[self.index] = stage.squared_grad_norm() / scale**2
            self._sums[t] = (scale, parts)
        out = torch.empty(note_size(self.num_stages), dtype=torch.float64)
        out[0], out[1], out[2:] = t, scale, parts
        return out

    def before_step(self, stage: NormStage, micro_batch: int) -> bool:
        """Unscale, update S (stage 0), clip; returns whether the step of the mini-batch of
        ``micro_batch`` (its last backward) is taken."""
        t = self._mini_batch(micro_batch)
        scale, parts = self._sums.pop(t)
        own = float(parts[self.index :].sum())
        taken = True
        scaler = stage.scaler
        if scaler is not None:
            scale_grads_(stage.trainable(), 1.0 / scale)
            taken = math.isfinite(own)
            if self.index == 0:
                scaler.update(own)
        if taken and stage.max_grad_norm is not None:
            older = float(self.known[1][: self.index].sum()) if self.known is not None else 0.0
            scale_grads_(stage.trainable(), clip_coefficient(own + older, stage.max_grad_norm))
        if self.index == 0 and taken and math.isfinite(own):
            self.known = (t, parts)
        return taken


class AsyncStage(NormStage, Protocol):
    """A stage that steps with :class:`AsyncNorms`."""

    async_norms: AsyncNorms | None

    def step(self, micro_batch: int | None = None, skip: bool = False) -> None: ...


def step_async(stage: AsyncStage, micro_batch: int) -> None:
    """The optimizer step of ``stage`` after the backward of ``micro_batch`` (the last of its
    mini-batch): unscale, clip, skip on an inf or NaN at this stage or a later one (then the
    gradients are dropped: a predictor must not read them)."""
    assert stage.async_norms is not None
    taken = stage.async_norms.before_step(stage, micro_batch)
    stage.step(micro_batch, skip=not taken)
    if not taken:
        for p in stage.trainable():
            p.grad = None
