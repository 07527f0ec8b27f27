"""The activation bytes autograd saves for the backward, per graph node, measured in one run
of the whole graph under ``torch.autograd.graph.saved_tensors_hooks`` (for the profiler)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from pipeoptim.storage import storage_address, storage_bytes


class SavedBytes(fx.Interpreter):
    """Runs the whole graph once, with gradients, and attributes every storage autograd saves
    for the backward to the first node that saves it (parameters excluded).

    A tensor saved by two operations (a ReLU's output, saved by the ReLU and by the linear
    layer that reads it) is held once, so it is counted once; measuring nodes one by one on
    fresh inputs would count it twice. A saved parameter gets the id ``param:<name>``: a stage
    holding it (its own, or a copy of a shared one) does not count it as an activation; a
    stage of an older plan that receives it keeps it as one
    (:func:`pipeoptim.compiler.boundaries.saved_activation_bytes`).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.saved: dict[str, int] = {}
        self.storages: dict[str, dict[str, int]] = {}  # node -> {storage id: bytes}
        self._owner: dict[int, str] = {}
        self._params = {  # frozen parameters are state, never sent: no id
            p.untyped_storage().data_ptr(): f"param:{name}" if p.requires_grad else ""
            for name, p in gm.named_parameters()
        }
        self._node = ""

    def run_node(self, n: fx.Node) -> Any:
        self._node = n.name
        return super().run_node(n)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = storage_address(t), storage_bytes(t)
        if not ptr:  # a sparse constant: no storage of its own (pipeoptim.storage)
            return t
        if ptr in self._params:
            if self._params[ptr]:
                self.storages.setdefault(self._node, {})[self._params[ptr]] = nbytes
            return t
        if ptr not in self._owner:
            self._owner[ptr] = str(len(self._owner))
            self.saved[self._node] = self.saved.get(self._node, 0) + nbytes
        self.storages.setdefault(self._node, {})[self._owner[ptr]] = nbytes
        return t


def saved_bytes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> SavedBytes:
    """Saved activations per node name (see :class:`SavedBytes`)."""
    counter = SavedBytes(gm)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        out = counter.run(*inputs)
    del out  # the saved tensors stay alive until here, so no storage address is reused
    return counter
