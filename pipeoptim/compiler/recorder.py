"""One run of a traced graph, recorded: every node's arguments and output, and the arguments
each node changed in place (the profiler's input, :mod:`pipeoptim.compiler.profile`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from pipeoptim.storage import storage_address


class Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's arguments and output, and the arguments
    each node changed in place (their version counter moved: ``mul_``, ``x[i] = v``,
    ``+=``, ``inplace=True``, a leaf module writing its input or its own buffers)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.records: dict[fx.Node, tuple[tuple, dict]] = {}
        self.changed: dict[fx.Node, list[torch.Tensor]] = {}
        self.changed_modules: dict[fx.Node, list[str]] = {}

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self.records[n] = (args, kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        versions = [t._version for t in tensors]
        modules = self._modules_run(n)
        buffers = [[b._version for b in m.buffers()] for _, m in modules]
        out = getattr(self, n.op)(n.target, args, kwargs)
        changed = [t for t, v in zip(tensors, versions) if t._version != v]
        if changed:
            self.changed[n] = changed
        moved = [name for (name, m), vs in zip(modules, buffers) if [b._version for b in m.buffers()] != vs]
        if moved:
            self.changed_modules[n] = moved
        return out

    def _modules_run(self, n: fx.Node) -> list[tuple[str, nn.Module]]:
        """The modules node ``n`` runs whole, each with the node that stands for it: a leaf's
        ``get_attr`` (:func:`pipeoptim.compiler.trace.call_leaf`), or ``n`` itself for a
        ``call_module``."""
        modules = [(a.name, self.env[a]) for a in n.all_input_nodes if isinstance(self.env.get(a), nn.Module)]
        if n.op == "call_module":
            modules.append((n.name, self.fetch_attr(str(n.target))))
        return modules

    def mutated_roots(self) -> dict[fx.Node, list[str]]:
        """Per node that changed an argument in place, the first nodes whose outputs hold the
        changed storages (a view's base, a buffer's ``get_attr``), and per node that changed
        the buffers of a module it runs whole (batch norm's running statistics), the node
        standing for that module (:meth:`_modules_run`); sorted by name."""
        first: dict[int, str] = {}
        for node, value in self.env.items():
            for t in pytree.tree_leaves(value):
                if isinstance(t, torch.Tensor) and (ptr := storage_address(t)):
                    first.setdefault(ptr, node.name)
        roots = {
            n: {first[ptr] for t in ts if (ptr := storage_address(t)) in first} - {n.name}
            for n, ts in self.changed.items()
        }
        for n, names in self.changed_modules.items():
            roots[n] = roots.get(n, set()) | set(names)
        return {n: sorted(names) for n, names in roots.items()}
