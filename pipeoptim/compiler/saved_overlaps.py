"""Saved storages that make a stage's activation memory other than the sum of its units'.

The cost model counts a stage's saved activations storage by storage
(:func:`pipeoptim.compiler.boundaries.saved_activation_bytes`): a storage saved by nodes in
two stages is held by each (the later one keeps the copy it received), and a parameter saved
by a node of a stage that does not own it is held there as an activation. The partitioners
sum each unit's ``saved_bytes``, in which a storage counts once, at its first saver: where a
cut falls between two savers of one storage, that sum was short of the stage's memory, so a
plan the partitioner called within a memory limit was over it (a ResNet's 2-stage plan at a
9 MiB limit: 9.61 MiB by the cost model, helper-136). :func:`overlaps` lists the storages for
which the two counts can differ; :func:`excess` is what a stage holds beyond the sum, per
micro-batch, for every stage between two ideals (the dynamic programs), and the ILP
(:mod:`pipeoptim.compiler.milp`) adds it through one variable per storage and stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeoptim.compiler.grouping import Units


@dataclass(frozen=True)
class Overlap:
    """Storages (bytes in all) held by a stage that holds a unit of ``savers`` and none of
    ``owners`` (the units that hold a saved parameter as a weight), of which the units' sum
    counts the bytes only at a stage holding unit ``first`` (``None``: nowhere, a parameter)."""

    nbytes: int
    savers: tuple[int, ...]
    first: int | None
    owners: tuple[int, ...]


def overlaps(units: Units) -> list[Overlap]:
    """The storages of ``units``' graph for which a stage's storage-by-storage count can differ
    from its units' sum of ``saved_bytes``, grouped by the units involved (empty where the
    profile has no storage ids, or every storage stays within one unit). A parameter is held
    as a weight by the units of the nodes naming it (a module called twice: both) and, for a
    get_attr's parameter, by those of its readers, which hold a copy where they are in
    another stage (:func:`pipeoptim.compiler.shared.shared_parameters`): a tied weight saved by
    its readers is no activation anywhere (helper-139)."""
    graph = units.graph
    savers: dict[str, set[int]] = {}
    first: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for key, size in node.saved.items():
            savers.setdefault(key, set()).add(units.unit_of[i])
            first.setdefault(key, units.unit_of[i])  # nodes in graph order: the first saver
            nbytes[key] = size
    owners: dict[str, set[int]] = {}
    readers = graph.users()
    for i, node in enumerate(graph.nodes):
        holders = {units.unit_of[i]}
        if node.op == "get_attr":
            holders |= {units.unit_of[r] for r in readers[i]}
        for name in node.params:
            owners.setdefault(f"param:{name}", set()).update(holders)
    grouped: dict[tuple[tuple[int, ...], int | None, tuple[int, ...]], int] = {}
    for key, held in savers.items():
        if key.startswith("param:"):
            owned = owners.get(key, set())
            if held <= owned:
                continue  # held as a weight wherever it is saved
            shape = (tuple(sorted(held)), None, tuple(sorted(owned)))
        else:
            if len(held) == 1:
                continue  # one unit: counted once, where it is
            shape = (tuple(sorted(held)), first[key], ())
        grouped[shape] = grouped.get(shape, 0) + nbytes[key]
    return [Overlap(size, *shape) for shape, size in grouped.items()]


def excess(found: list[Overlap], before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Bytes per micro-batch that the stage ``after[j] \\ before[i]`` saves beyond its units'
    sum of ``saved_bytes``, as ``[i, j]`` (meaningful where ``before[i]`` is a subset of
    ``after[j]``; boolean matrices, one row per set of units, one column per unit); zeros
    where ``found`` is empty."""
    out = np.zeros((len(before), len(after)))
    for o in found:
        held = _in_stage(o.savers, before, after)
        if o.owners:
            held &= ~_in_stage(o.owners, before, after)
        out += o.nbytes * held
        if o.first is not None:
            out -= o.nbytes * (after[None, :, o.first] & ~before[:, None, o.first])
    return out


def _in_stage(members: tuple[int, ...], before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``[i, j]``: whether the stage ``after[j] \\ before[i]`` holds a unit of ``members``."""
    return after[:, list(members)].sum(axis=1)[None, :] > before[:, list(members)].sum(axis=1)[:, None]


def prefixes(units: Units) -> np.ndarray:
    """The prefixes of the unit order as sets of units (row ``a``: the units before ``a``), for
    :func:`excess` over contiguous splits."""
    n = len(units)
    return np.tri(n + 1, n, -1, dtype=bool)
