"""Gradient all-reduce between the replicas of a stage (data × pipeline parallelism).

With a layout of N stages × R replicas every stage's R replicas hold the same weights and
each computes the gradients of its share of the mini-batch's micro-batches, already scaled
by their share of the *whole* mini-batch (:func:`pipeoptim.microbatch.scales`). Their sum is
therefore the gradient of the whole mini-batch, as plain training on it (or gradient
accumulation over the same micro-batches) computes it, and every replica steps with that
sum: the replicas stay bit-identical.

Gradients are packed into flat buckets (one per dtype and device, at most ``bucket_bytes``
each; DDP's gradient buckets, Li et al., VLDB 2020), each led by one presence flag per
parameter, so a parameter that got no gradient on any replica (a branch no row took) keeps
``grad is None`` while one that got a gradient on some replica gets the sum (zeros standing
in for the others), as plain training on the whole mini-batch does.

**Overlap with the backward** (:class:`GroupAllReduce`, as DDP does it). A stage's gradients
are final once the last backward before an optimizer step has reached them: the flushing
methods (GPipe, 1F1B) step after the mini-batch's last micro-batch, the asynchronous ones
after every backward (2BW: every M-th). The worker arms the reducer before that backward
(:meth:`GroupAllReduce.arm`); a post-accumulate-grad hook on every parameter then starts a
bucket's all-reduce (``async_op=True``) as soon as the backward has produced all of its
gradients, while the backward goes on. The buckets hold the parameters in reverse order (the
backward reaches the last layers first) and start strictly in bucket order, so every replica
issues the same collectives in the same order whatever its branches. The last bucket, ready
only as the backward ends, starts at the step, after the stage has sent the previous stage its
input gradients (the pipeline's critical path; started in the hook, its reduction would compete
with that send for the CPU); so do buckets the last backward did not complete (a parameter it
did not reach). The step then waits on all of them. With one bucket nothing overlaps. The
sums are the same bits as without the overlap; the local executor sums in memory
(:func:`sum_in_memory`), with nothing to overlap.

The ring all-reduce moves ``2(R−1)/R · bytes`` per replica (Patarasuk and Yuan, JPDC 2009);
:attr:`pipeoptim.compiler.costmodel.CostConfig.allreduce_s_per_byte` uses it, and
:func:`pipeoptim.compiler.overlap.exposed_allreduce_seconds` the part the overlap leaves after
the backward.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pipeoptim.compiler.overlap import BUCKET_BYTES, bucket_starts
from pipeoptim.errors import PeerLostError, first_line


def buckets(params: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """``params`` grouped by dtype and device, in order, each group cut into buckets as the
    cost model counts them (:func:`~pipeoptim.compiler.overlap.bucket_starts`)."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    out = []
    for group in groups.values():
        starts = bucket_starts([p.numel() * p.element_size() for p in group], bucket_bytes)
        out += [group[a:b] for a, b in zip(starts, [*starts[1:], len(group)])]
    return out


def pack(bucket: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat tensor: a presence flag (1 or 0) per parameter, then every gradient
    flattened (zeros for a parameter without one)."""
    first = bucket[0]
    flags = torch.tensor([p.grad is not None for p in bucket], dtype=first.dtype, device=first.device)
    parts = [flags]
    for p in bucket:
        if p.grad is None:
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
        else:
            parts.append(p.grad.reshape(-1))
    return torch.cat(parts)


def unpack(bucket: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Write the reduced ``flat`` back as the gradients of ``bucket``: a parameter flagged on
    no replica keeps ``grad is None``."""
    offset = len(bucket)
    present = flat[:offset].tolist()
    for p, flag in zip(bucket, present):
        value = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        if not flag:
            continue
        if p.grad is None:
            p.grad = value.clone()
        else:
            p.grad.copy_(value)


def sum_in_memory(replicas: Sequence[Sequence[torch.Tensor]], bucket_bytes: int = BUCKET_BYTES) -> None:
    """The local executor's all-reduce: every replica's parameters (same order, same shapes)
    get the sum of all replicas' gradients, added in replica order.

    For two replicas this is bit for bit what gloo's all-reduce gives (``a + b`` on both);
    for more, gloo's ring may add in another order (rounding differences only)."""
    per_replica = [buckets(params, bucket_bytes) for params in replicas]
    for parts in zip(*per_replica):
        total = pack(parts[0])
        for bucket in parts[1:]:
            total += pack(bucket)
        for bucket in parts:
            unpack(bucket, total)


class GroupAllReduce:
    """Sums the gradients of a stage over its replicas' process group (``torch.distributed``),
    overlapped with the last backward before each step (see the module's documentation).

    Args:
        group: the process group of the stage's replicas (``dist.new_group``).
        timeout: seconds the reduction may wait for the slowest replica.
        stage: the stage index (named in errors).
        bucket_bytes: largest bucket, bytes.
    """

    def __init__(
        self, group: dist.ProcessGroup, timeout: float, stage: int, bucket_bytes: int = BUCKET_BYTES
    ) -> None:
        self.group = group
        self.timeout = datetime.timedelta(seconds=timeout)
        self.stage = stage
        self.bucket_bytes = bucket_bytes
        self._params: list[torch.Tensor] = []
        self._buckets: list[list[torch.Tensor]] = []
        self._bucket_of: dict[int, int] = {}
        self._reached: list[set[int]] = []
        self._armed = False
        self._flats: list[torch.Tensor] = []
        self._works: list[Any] = []
        self._hooks: list[Any] = []
        #: buckets whose all-reduce started during the backward (not at the step), in all
        self.overlapped = 0

    def attach(self, params: Sequence[torch.Tensor]) -> None:
        """Bucket the stage's trainable ``params`` (reverse order) and hook each one (the hooks
        of earlier parameters removed)."""
        self.detach()
        self._params = list(params)
        self._buckets = buckets(self._params[::-1], self.bucket_bytes)
        self._bucket_of = {id(p): i for i, bucket in enumerate(self._buckets) for p in bucket}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self._params]

    def detach(self) -> None:
        """Remove the parameters' hooks: they hold this reducer, and through it its process
        group, for as long as the parameters live (the user's model outlives the pipeline)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def arm(self) -> None:
        """The next backward is the last before a step: start each bucket's all-reduce as soon
        as that backward has produced all of the bucket's gradients."""
        self._armed = True
        self._reached = [set() for _ in self._buckets]

    def _on_gradient(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        self._reached[self._bucket_of[id(p)]].add(id(p))
        while len(self._works) < len(self._buckets) - 1:  # the last one starts at the step
            nxt = len(self._works)
            if len(self._reached[nxt]) < len(self._buckets[nxt]):
                break
            self._start(nxt)
            self.overlapped += 1

    def _start(self, index: int) -> None:
        flat = pack(self._buckets[index])
        self._flats.append(flat)
        self._works.append(dist.all_reduce(flat, group=self.group, async_op=True))

    def __call__(self, params: Sequence[torch.Tensor]) -> None:
        """At the step: start the buckets not started yet, wait on all, write the sums back.

        Raises:
            PeerLostError: a replica did not take part before the timeout.
        """
        if [id(p) for p in params] != [id(p) for p in self._params]:
            self.attach(params)  # first use without attach, or the optimizer's parameters changed
        self._armed = False
        while len(self._works) < len(self._buckets):
            self._start(len(self._works))
        works, flats, self._works, self._flats = self._works, self._flats, [], []
        for work in works:
            try:
                work.wait(self.timeout)
            except RuntimeError as exc:
                raise PeerLostError(
                    f"stage {self.stage}: the gradient all-reduce between its replicas failed "
                    f"({first_line(exc)}); a replica has probably stopped"
                ) from exc
        for bucket, flat in zip(self._buckets, flats):
            unpack(bucket, flat)


GradientReducer = Callable[[Sequence[torch.Tensor]], None]
