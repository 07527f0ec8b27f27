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
in for the others), as plain training on the whole mini-batch does. The buckets are reduced
together (asynchronously, then waited on), just before the optimizer step: the reduction is
*not* overlapped with the backward, and the cost model counts it in full.

The ring all-reduce moves ``2(R−1)/R · bytes`` per replica (Patarasuk and Yuan, JPDC 2009);
:func:`pipeoptim.compiler.layouts.allreduce_seconds` uses it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from pipeoptim.errors import PeerLostError

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def buckets(params: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """``params`` grouped by dtype and device, in order, at most ``bucket_bytes`` a group
    (a larger parameter gets a group of its own)."""
    groups: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    for p in params:
        lists = groups.setdefault((p.dtype, p.device), [[]])
        size = p.numel() * p.element_size()
        if lists[-1] and sum(q.numel() * q.element_size() for q in lists[-1]) + size > bucket_bytes:
            lists.append([])
        lists[-1].append(p)
    return [bucket for lists in groups.values() for bucket in lists if bucket]


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
    """Sums the gradients of a stage over its replicas' process group (``torch.distributed``).

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

    def __call__(self, params: Sequence[torch.Tensor]) -> None:
        parts = buckets(params, self.bucket_bytes)
        flats = [pack(bucket) for bucket in parts]
        works = [dist.all_reduce(flat, group=self.group, async_op=True) for flat in flats]
        for work in works:
            try:
                work.wait(self.timeout)
            except RuntimeError as exc:
                raise PeerLostError(
                    f"stage {self.stage}: the gradient all-reduce between its replicas failed "
                    f"({str(exc).splitlines()[0]}); a replica has probably stopped"
                ) from exc
        for bucket, flat in zip(parts, flats):
            unpack(bucket, flat)


GradientReducer = Callable[[Sequence[torch.Tensor]], None]
