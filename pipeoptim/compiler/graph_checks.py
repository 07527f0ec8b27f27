"""Whether a cost graph can be planned with (:meth:`pipeoptim.compiler.costgraph.CostGraph.validate`)."""

from __future__ import annotations

from typing import Any

from pipeoptim.errors import ProfileError
from pipeoptim.units import MAX_BYTES, MAX_SECONDS, is_seconds

#: the node kinds of a torch.fx graph
OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_COSTS = ("fwd_s", "bwd_s", "out_bytes", "grad_bytes", "param_bytes", "buffer_bytes", "saved_bytes")


def check_graph(graph: Any, origin: str) -> None:
    """Raise ProfileError naming what in ``graph`` (a CostGraph) cannot be planned with (see
    :meth:`~pipeoptim.compiler.costgraph.CostGraph.validate`)."""
    for node in graph.nodes:
        for name in _COSTS:
            value = getattr(node, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProfileError(f"{origin}: node {node.name!r} has {name} = {value!r}, not a number")
            bytes_ok = 0 <= value <= MAX_BYTES and value == int(value)  # 1.5 bytes was planned (helper-136)
            if not (is_seconds(value) if name.endswith("_s") else bytes_ok):
                raise ProfileError(
                    f"{origin}: node {node.name!r} has {name} = {value}; times must be seconds from 0 "
                    f"to {MAX_SECONDS:.0f} and sizes whole bytes from 0 to {MAX_BYTES:.0e}: fix or "
                    "re-measure that node"
                )
    for node in graph.nodes:  # the structure later code walks (a hand edit made them tracebacks)
        shapes = {
            "inputs": isinstance(node.inputs, list) and all(isinstance(x, str) for x in node.inputs),
            "params": isinstance(node.params, list) and all(isinstance(x, str) for x in node.params),
            "saved": isinstance(node.saved, dict) and all(isinstance(v, int) for v in node.saved.values()),
            "out_meta": isinstance(node.out_meta, list) and all(isinstance(m, dict) for m in node.out_meta),
            "op": node.op in OPS,
        }
        for name in [k for k, fine in shapes.items() if not fine]:
            raise ProfileError(
                f"{origin}: node {node.name!r} has {name} = {getattr(node, name)!r}, not what a profile "
                "holds there: re-measure the profile"
            )
    if isinstance(graph.batch_size, bool) or not isinstance(graph.batch_size, int) or graph.batch_size < 1:
        raise ProfileError(f"{origin}: batch_size {graph.batch_size!r} is not a positive whole number")
    if not (
        isinstance(graph.tied, dict)
        and all(isinstance(v, list) and all(isinstance(a, str) for a in v) for v in graph.tied.values())
    ):
        raise ProfileError(
            f"{origin}: tied {graph.tied!r} is not {{name: [aliases]}}; re-measure the profile"
        )
    if not any(n.op == "output" for n in graph.nodes):
        raise ProfileError(f"{origin}: the graph has no node with op 'output'; add the model's output node")
    outputs = [i for i, n in enumerate(graph.nodes) if n.op == "output"]
    if outputs != [len(graph.nodes) - 1]:  # nodes after it were planned as work (helper-129)
        after = graph.nodes[outputs[0] + 1].name  # the first output is not the last node
        raise ProfileError(
            f"{origin}: the graph's one node with op 'output' must be its last, but node {after!r} "
            f"comes after it ({len(outputs)} output node(s)); nothing runs after the model's output"
        )
    if not any(n.time_s > 0 or n.param_bytes > 0 for n in graph.nodes):
        raise ProfileError(
            f"{origin}: every node has zero time and no parameters, so there is nothing to "
            "place; re-measure the profile"
        )
    if not any(n.time_s > 0 for n in graph.nodes):  # a bottleneck of 0 s: every plan is "optimal"
        raise ProfileError(
            f"{origin}: every node has zero forward and backward time, so no plan can be told "
            "faster than another; re-measure the profile (its times are missing)"
        )
