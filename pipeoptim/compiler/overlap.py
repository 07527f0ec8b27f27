"""The part of the replicas' gradient all-reduce that the backward does not hide.

The runtime starts each gradient bucket's all-reduce as soon as the last backward before an
optimizer step has produced the bucket's gradients (:mod:`pipeoptim.runtime.allreduce`, as
PyTorch DDP does; Li et al., VLDB 2020, §3.2.3). Model: the stage's ``n`` buckets are equal,
bucket ``i`` (1-based) is ready at ``b · i / n`` into a backward of ``b`` seconds (gradients
appear at a uniform rate), and the buckets are reduced one after another, ``A / n`` seconds
each, ``A`` being the whole all-reduce. The last bucket's reduction then ends at
``max(b + A/n, b/n + A)`` (either the link keeps up and only the last bucket is left when the
backward ends, or the link is the bottleneck from the first bucket on), so the time it adds
after the backward is::

    exposed(A, b, n) = max(A / n, A − b · (n − 1) / n)

The runtime starts the last bucket at the step, right after the backward (and the gradient
send to the previous stage): the time this model gives it. With one bucket nothing overlaps
(``exposed = A``); with a backward much longer than the all-reduce only the last bucket shows
(``A / n``).
"""

from __future__ import annotations

from collections.abc import Sequence

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def bucket_starts(sizes: Sequence[float], bucket_bytes: int = BUCKET_BYTES) -> list[int]:
    """Where each gradient bucket begins among parameters of ``sizes`` bytes, in the order the
    backward produces their gradients: a bucket takes them in turn while its bytes stay within
    ``bucket_bytes`` (one larger than that gets a bucket of its own; DDP closes a bucket once
    it reaches the cap instead). The runtime cuts its buckets so
    (:func:`pipeoptim.runtime.allreduce.buckets`) and the cost model counts them so
    (:func:`bucket_count`), over the graph's nodes: a node's parameters count as one, where
    the runtime may cut between them (a bias, then a weight over ``bucket_bytes``)."""
    starts: list[int] = []
    filled = 0.0
    for i, size in enumerate(sizes):
        if not starts or filled + size > bucket_bytes:
            starts.append(i)
            filled = 0.0
        filled += size
    return starts


def bucket_count(sizes: Sequence[float], bucket_bytes: int = BUCKET_BYTES) -> int:
    """Buckets of :func:`bucket_starts` (at least one): 4 parameters of 15 MiB make 4 buckets of
    25 MiB, not the 3 their 60 MiB would fill."""
    return max(1, len(bucket_starts(sizes, bucket_bytes)))


def exposed_allreduce_seconds(allreduce_s: float, backward_s: float, buckets: int) -> float:
    """Seconds the all-reduce adds after the backward: ``max(A/n, A − b(n−1)/n)`` (module
    documentation).

    Args:
        allreduce_s: A, seconds of the whole all-reduce of the stage's gradients.
        backward_s: b, seconds of the last backward before the step.
        buckets: n, the gradient buckets (:func:`bucket_count`).

    Raises:
        ValueError: a negative time or fewer than one bucket.
    """
    if allreduce_s < 0 or backward_s < 0 or buckets < 1:
        raise ValueError(
            f"exposed all-reduce needs times >= 0 and buckets >= 1, got A={allreduce_s}, "
            f"b={backward_s}, n={buckets}"
        )
    return max(allreduce_s / buckets, allreduce_s - backward_s * (buckets - 1) / buckets)
