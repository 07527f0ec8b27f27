"""Units: contiguous groups of graph nodes, the granularity the partitioner places.

Nodes are first put in a *normalised* topological order in which every node without inputs
(``get_attr`` of a parameter, constants) sits right before its first user, so a parameter
always lands in the stage of the operation that first reads it. Each unit is a run of
consecutive nodes in that order; because the order is topological, edges between units only
run forward and the unit graph is a DAG.

Large graphs are *coarsened*: consecutive units inside the same module (a transformer block,
a residual block) are merged, deepest modules first, as long as a unit stays below a share of
the total time that keeps stages balanceable; then the cheapest neighbouring pairs are merged
until at most ``max_units`` remain.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from pipeoptim.compiler.cost_node import CostNode
from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.costmodel import CostConfig
from pipeoptim.compiler.shared import is_parameter

#: Pin value of a unit that must be in the last stage (the graph output).
LAST = -1
_KEEP = -2  # while coarsening: a unit that must stay the first of its group


def _unkeep(pin: list[int | None]) -> list[int | None]:
    return [None if p == _KEEP else p for p in pin]


@dataclass
class Units:
    """A grouping of a cost graph's nodes into contiguous units.

    Attributes:
        members: node indices of each unit, in normalised order.
        pin: per unit, the stage it must be in (0 for inputs, :data:`LAST` for the output)
            or ``None``.
    """

    graph: CostGraph
    members: list[list[int]]
    pin: list[int | None]

    def __post_init__(self) -> None:
        self.unit_of = [0] * len(self.graph.nodes)
        for u, nodes in enumerate(self.members):
            for i in nodes:
                self.unit_of[i] = u

    def __len__(self) -> int:
        return len(self.members)

    def time(self, u: int, config: CostConfig, stage: int | None = None) -> float:
        """Seconds of unit ``u`` per micro-batch: :meth:`CostConfig.work_s` of its nodes, plus
        the weight policy's work on its parameters at ``stage`` (``None``: on none, a lower
        bound for any stage)."""
        work = sum(config.work_s(self.graph.nodes[i]) for i in self.members[u])
        if stage is None:
            return work
        return work + self.attr(u, "param_bytes") * config.weight_s_per_byte(stage)

    def attr(self, u: int, name: str) -> float:
        return sum(getattr(self.graph.nodes[i], name) for i in self.members[u])

    def is_compute(self, u: int) -> bool:
        """Whether the unit does work (time or parameters); stages must each get one. A shared
        parameter's get_attr alone (:func:`fine_units`) does none: its readers' stages hold it."""
        nodes = [self.graph.nodes[i] for i in self.members[u]]
        if all(n.op == "get_attr" for n in nodes):
            return False
        # the output node's time is the loss's (pipeoptim.loss_cost): it makes no stage
        return any((n.time_s > 0 and n.op != "output") or n.param_bytes > 0 for n in nodes)

    def edges(self) -> set[tuple[int, int]]:
        """Unit-level edges ``(a, b)`` with ``a < b``."""
        result = set()
        for i, node in enumerate(self.graph.nodes):
            b = self.unit_of[i]
            for inp in node.inputs:
                a = self.unit_of[self.graph.index(inp)]
                if a != b:
                    result.add((a, b))
        return result

    def producers(self) -> list[tuple[int, list[int]]]:
        """Nodes whose output leaves their unit: ``(node index, [reading units])``. A trainable
        parameter is not among them: every stage reading it holds a copy
        (:mod:`pipeoptim.compiler.shared`)."""
        result = []
        for p, readers in enumerate(self.graph.users()):
            if is_parameter(self.graph.nodes[p]):
                continue
            units = sorted({self.unit_of[r] for r in readers} - {self.unit_of[p]})
            if units:
                result.append((p, units))
        return result

    def crossings(self) -> dict[tuple[int, tuple[int, ...]], int]:
        """Values leaving their unit, grouped: ``{(unit, last readers): bytes}``.

        Bytes are activation plus gradient bytes. Only the *last* readers matter (a reader
        from which another reader can be reached is never in a later stage), so readers
        that reach another reader are dropped and values with the same producing unit and
        last readers are summed.
        """
        edges = self.edges()
        succ: list[list[int]] = [[] for _ in self.members]
        for a, b in edges:
            succ[a].append(b)
        reach = [0] * len(self.members)  # bitset of units reachable from u (u excluded)
        for u in range(len(self.members) - 1, -1, -1):
            for v in succ[u]:
                reach[u] |= (1 << v) | reach[v]
        groups: dict[tuple[int, tuple[int, ...]], int] = {}
        for p, readers in self.producers():
            node = self.graph.nodes[p]
            size = node.out_bytes + node.grad_bytes
            if size == 0:
                continue
            last = tuple(b for b in readers if not any(reach[b] >> c & 1 for c in readers))
            key = (self.unit_of[p], last)
            groups[key] = groups.get(key, 0) + size
        return groups

    def expand(self, unit_stage: list[int]) -> list[int]:
        """Stage of every node from the stage of every unit; a parameter read by several nodes
        goes to the first stage reading it (its unit may sit in an earlier one, which would
        then hold a copy it never reads)."""
        stage_of = [unit_stage[self.unit_of[i]] for i in range(len(self.graph.nodes))]
        for i, readers in enumerate(self.graph.users()):
            if _shared_weight(self.graph.nodes[i], readers):
                stage_of[i] = min(stage_of[r] for r in readers)
        return stage_of


def _shared_weight(node: CostNode, readers: list[int]) -> bool:
    """A trainable parameter's get_attr read by several nodes (by name: its bytes may sit at
    its readers, :func:`pipeoptim.compiler.held_memory.params_at_readers`). A buffer read so
    (a causal mask) joins its first reader like any input-free node: as a unit of its own the
    partitioners counted its bytes in a stage that did not hold it, and a limit a plan meets
    was refused (helper-142)."""
    return node.op == "get_attr" and (node.param_bytes > 0 or bool(node.params)) and len(readers) > 1


def normalised_order(graph: CostGraph) -> list[int]:
    """Topological order: inputs first, input-free nodes right before their first user."""
    users = graph.users()
    floating = {
        i: min(users[i])
        for i, n in enumerate(graph.nodes)
        if not n.inputs and n.op != "placeholder" and users[i]
    }
    before: dict[int, list[int]] = {}
    for i, first in floating.items():
        before.setdefault(first, []).append(i)
    order = [i for i, n in enumerate(graph.nodes) if n.op == "placeholder"]
    for i in range(len(graph.nodes)):
        if i in floating or graph.nodes[i].op == "placeholder":
            continue
        order.extend(before.get(i, []))
        order.append(i)
    return order


def fine_units(graph: CostGraph) -> Units:
    """One unit per node, except that input-free nodes join their first user's unit (a
    parameter read by several nodes aside), a node
    whose output cannot be sent (:attr:`CostNode.sendable`) shares a unit with every user of
    that output, and a node that changes a tensor in place (:attr:`CostNode.mutates`) shares a
    unit with the node that produced the tensor and everything between them, so that no stage
    boundary falls between them; one that changes the buffers of a module it runs whole (batch
    norm's running statistics) shares it with every other call of that module (each stage would
    otherwise update a copy of its own: a siamese model's batch norm, helper-116).

    A change in another stage than its tensor's would change a received copy: lost for a
    buffer (``self.ema.mul_(0.9)``), unseen by readers the plan puts in the producer's stage,
    refused by autograd on a received value that needs a gradient (``h.clamp_(min=0)`` right
    after a cut). In one unit, with the stage's nodes in graph order and its values sent after
    its forward, readers before the change read the tensor before it and readers after it (in
    that stage or later ones) read it changed, as in the model."""
    users = graph.users()
    order = normalised_order(graph)
    position = {i: k for k, i in enumerate(order)}
    changed_until: dict[int, int] = {}  # first node of a changed tensor -> position the hold ends
    for i, node in enumerate(graph.nodes):
        for name in node.mutates:
            # an attribute (buffer, parameter) is not sent between stages but copied into each
            # stage that reads it, through one get_attr node or several: every reader of it
            # joins the hold, or it would read its stage's unchanged copy
            root = graph.nodes[graph.index(name)]
            roots = [graph.index(name)]
            if root.op in ("get_attr", "call_module"):  # a module run whole: every call of it too
                roots = [j for j, n in enumerate(graph.nodes) if (n.op, n.target) == (root.op, root.target)]
                roots += [u for j in list(roots) for u in users[j]] if root.op == "get_attr" else []
            first = order[min(position[j] for j in roots)]
            end = max(position[i], *(position[j] for j in roots))
            changed_until[first] = max(changed_until.get(first, -1), end)
    members: list[list[int]] = []
    pin: list[int | None] = []
    pending: list[int] = []
    hold_until = -1  # position of the last node that must join the unit of those in ``pending``
    for k, i in enumerate(order):
        node = graph.nodes[i]
        if not node.sendable and node.op not in ("placeholder", "output") and users[i]:
            hold_until = max(hold_until, *(position[u] for u in users[i]))
        hold_until = max(hold_until, changed_until.get(i, -1))
        # an input-free node joins its first user's unit; a parameter read by several nodes
        # (tied weights) stays a unit of its own: in the first reader's it ordered the other
        # readers after that one, independent branches too (a plan 2x slower, helper-129)
        shared = _shared_weight(node, users[i])
        if (not node.inputs and node.op != "placeholder" and users[i] and not shared) or k < hold_until:
            pending.append(i)
            continue
        unit = [*pending, i]
        members.append(unit)
        pending = []
        ops = {graph.nodes[j].op for j in unit}
        pin.append(LAST if "output" in ops else 0 if "placeholder" in ops else None)
    return Units(graph, members, pin)


def _module_key(graph: CostGraph, nodes: list[int], depth: int) -> str:
    paths = {graph.nodes[i].module for i in nodes if graph.nodes[i].op != "get_attr"}
    if len(paths) != 1:
        return ""
    parts = next(iter(paths)).split(".")
    return ".".join(parts[:depth]) if len(parts) >= depth and parts[0] else ""


def coarsen(
    units: Units, max_units: int, num_stages: int, keep_starts: frozenset[int] = frozenset()
) -> Units:
    """Merge neighbouring units until at most ``max_units`` remain (see module docstring).

    A merge along the module hierarchy never makes a unit slower than ``total / (2 N)``,
    so that N stages can still be balanced. A unit whose first node is in ``keep_starts``
    is never merged into the unit before it (so a known plan stays representable).
    """
    graph = units.graph
    members = [list(m) for m in units.members]
    pin = [_KEEP if p is None and m[0] in keep_starts else p for m, p in zip(members, units.pin)]
    if len(members) <= max_units:
        return Units(graph, members, _unkeep(pin))
    cap = graph.total_time_s / (2 * num_stages)
    depth = max((len(n.module.split(".")) for n in graph.nodes if n.module), default=0)
    for d in range(depth, 0, -1):
        if len(members) <= max_units:
            break
        merged: list[list[int]] = []
        merged_pin: list[int | None] = []
        for nodes, p in zip(members, pin):
            if merged and p is None and merged_pin[-1] in (None, _KEEP):
                key = _module_key(graph, nodes, d)
                prev = merged[-1]
                t = sum(graph.nodes[i].time_s for i in prev + nodes)
                if key and key == _module_key(graph, prev, d) and t <= cap:
                    prev.extend(nodes)
                    continue
            merged.append(list(nodes))
            merged_pin.append(p)
        members, pin = merged, merged_pin
    if len(members) > max_units:
        members, pin = _merge_cheapest(graph, members, pin, max_units)
    return Units(graph, members, _unkeep(pin))


def _merge_cheapest(
    graph: CostGraph, members: list[list[int]], pin: list[int | None], max_units: int
) -> tuple[list[list[int]], list[int | None]]:
    """Merge the neighbouring pair with the smallest total time until ``max_units`` remain."""
    times = [sum(graph.nodes[i].time_s for i in m) for m in members]
    nxt = list(range(1, len(members) + 1))
    prv = list(range(-1, len(members) - 1))
    alive = [True] * len(members)
    version = [0] * len(members)
    heap = []

    def push(a: int) -> None:
        b = nxt[a]
        if b < len(members) and pin[a] in (None, _KEEP) and pin[b] is None:
            heapq.heappush(heap, (times[a] + times[b], a, version[a], version[b]))

    for a in range(len(members)):
        push(a)
    count = len(members)
    while count > max_units and heap:
        _, a, va, vb = heapq.heappop(heap)
        b = nxt[a] if a < len(members) else len(members)
        if not alive[a] or b >= len(members) or version[a] != va or version[b] != vb:
            continue
        members[a].extend(members[b])
        times[a] += times[b]
        alive[b] = False
        nxt[a] = nxt[b]
        if nxt[b] < len(members):
            prv[nxt[b]] = a
        version[a] += 1
        count -= 1
        push(a)
        if prv[a] >= 0:
            push(prv[a])
    keep = [i for i in range(len(members)) if alive[i]]
    return [members[i] for i in keep], [pin[i] for i in keep]
