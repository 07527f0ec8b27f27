"""One stage's costs in a plan: :class:`StageStats`, computed by
:func:`pipeoptim.compiler.costmodel.evaluate` (see there for each figure's formula)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class StageStats:
    """Costs of one stage (seconds per micro-batch, bytes)."""

    index: int
    num_nodes: int
    first_node: str
    last_node: str
    param_bytes: int
    fwd_s: float
    bwd_s: float
    recv_bytes: int
    send_bytes: int
    comm_s: float
    update_s: float
    weight_bytes: int
    grad_bytes: int
    opt_state_bytes: int
    copy_bytes: int
    buffer_bytes: int
    activation_bytes: int
    memory_bytes: int
    time_s: float
    overhead_s: float = 0.0
    #: bytes this stage sends (and receives) per optimizer step to sum the gradients of the
    #: shared parameters it holds (:func:`pipeoptim.compiler.shared.reduce_bytes`)
    shared_bytes: int = 0
    #: seconds per optimizer step of that exchange (both ways, at the bandwidth)
    shared_s: float = 0.0
    allreduce_s: float = 0.0  # the replicas' gradient all-reduce not overlapped, per micro-batch
    #: whether the stage recomputes its forward before each backward (planned recomputation)
    recompute: bool = False
    #: seconds per micro-batch of that recomputation (its forward again; 0 without)
    recompute_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return self.fwd_s + self.bwd_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compute_s": self.compute_s}
