"""One run of a traced graph, recorded: every node's arguments and output, and the arguments
each node changed in place (the profiler's input, :mod:`pipeoptim.compiler.profile`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from pipeoptim.storage import storage_address


class Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's arguments and output, and the arguments
    each node changed in place (their version counter moved: ``mul_``, ``x[i] = v``,
    ``+=``, ``inplace=True``, a leaf module writing its input)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.records: dict[fx.Node, tuple[tuple, dict]] = {}
        self.changed: dict[fx.Node, list[torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self.records[n] = (args, kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        versions = [t._version for t in tensors]
        out = getattr(self, n.op)(n.target, args, kwargs)
        changed = [t for t, v in zip(tensors, versions) if t._version != v]
        if changed:
            self.changed[n] = changed
        return out

    def mutated_roots(self) -> dict[fx.Node, list[str]]:
        """Per node that changed an argument in place, the first nodes whose outputs hold the
        changed storages (a view's base, a buffer's ``get_attr``), sorted by name."""
        first: dict[int, str] = {}
        for node, value in self.env.items():
            for t in pytree.tree_leaves(value):
                if isinstance(t, torch.Tensor) and (ptr := storage_address(t)):
                    first.setdefault(ptr, node.name)
        return {
            n: sorted({first[ptr] for t in ts if (ptr := storage_address(t)) in first} - {n.name})
            for n, ts in self.changed.items()
        }
