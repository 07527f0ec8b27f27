"""One node of a cost graph (:mod:`pipeoptim.compiler.costgraph`) and its measured costs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CostNode:
    """One graph node and its measured costs (per micro-batch).

    Attributes:
        name: fx node name, unique in the graph.
        op: fx opcode (placeholder, get_attr, call_module, call_function, call_method, output).
        target: module path, function or method name.
        inputs: names of the nodes this node reads (the graph's edges).
        fwd_s: median forward seconds of the node alone.
        bwd_s: median backward seconds of the node alone (0 where nothing needs a gradient).
        out_bytes: bytes of the values the node outputs (what crosses a stage boundary).
        grad_bytes: bytes of the gradient sent back for those outputs (floating point tensors
            that require a gradient; 0 for integer tensors).
        param_bytes: bytes of the trainable parameters this node owns.
        params: qualified names of those parameters.
        buffer_bytes: bytes of non-trainable state the node owns (buffers, frozen parameters).
        saved_bytes: activation bytes autograd keeps from the forward for the backward,
            each saved storage counted at the first node that saves it.
        saved: every storage the node saves, ``{storage id: bytes}`` (ids shared between the
            nodes that save the same tensor), so that a stage counts each of its storages once;
            empty in profiles that do not record it.
        module: innermost module path the node was traced in.
        module_type: that module's class name.
        out_meta: one entry per flat output value: ``{"kind": "tensor", "shape", "dtype",
            "requires_grad", "batch_dim"}`` or ``{"kind": "int" | "float" | "bool" | "none" |
            "module" | "other"}`` (leaves in ``torch.utils._pytree`` order).
        out_container: ``""`` when the output is one value, ``"tuple"`` or ``"list"`` when it is
            a flat sequence of the values in ``out_meta``, ``"nested"`` otherwise.
        mutates: the nodes whose output this node changes in place (``h.mul_(0.5)``,
            ``x[:, 0] = 0``, ``self.ema.mul_(0.9)``, a module with ``inplace=True``), each named
            by the first node that produced the changed storage (for a view, its base);
            the partitioner keeps the node in that node's stage
            (:func:`pipeoptim.compiler.grouping.fine_units`).
    """

    name: str
    op: str
    target: str
    inputs: list[str]
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    out_bytes: int = 0
    grad_bytes: int = 0
    param_bytes: int = 0
    params: list[str] = field(default_factory=list)
    buffer_bytes: int = 0
    saved_bytes: int = 0
    saved: dict[str, int] = field(default_factory=dict)
    module: str = ""
    module_type: str = ""
    out_meta: list[dict[str, Any]] = field(default_factory=list)
    out_container: str = ""
    mutates: list[str] = field(default_factory=list)

    @property
    def time_s(self) -> float:
        """Forward plus backward seconds."""
        return self.fwd_s + self.bwd_s

    @property
    def again_s(self) -> float:
        """Seconds of this node's forward run again where its stage recomputes: ``fwd_s``, but
        the output node's, which is the loss (:mod:`pipeoptim.loss_cost`), not recomputed."""
        return 0.0 if self.op == "output" else self.fwd_s

    @property
    def sendable(self) -> bool:
        """Whether the output can cross a stage boundary: tensors, numbers and flat tuples of
        them (not modules, devices, nested structures...)."""
        return self.out_container != "nested" and not any(
            m.get("kind") in ("module", "other") for m in self.out_meta
        )
