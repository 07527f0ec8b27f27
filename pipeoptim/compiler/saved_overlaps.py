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
from pipeoptim.compiler.shared import is_parameter


@dataclass(frozen=True)
class Overlap:
    """Storages (bytes in all) held by a stage that holds a unit of ``savers``, unless it holds
    unit ``owner`` (a saved parameter's own unit), of which the units' sum counts the bytes
    only at a stage holding unit ``first`` (``None``: nowhere, a parameter)."""

    nbytes: int
    savers: tuple[int, ...]
    first: int | None
    owner: int | None


def overlaps(units: Units) -> list[Overlap]:
    """The storages of ``units``' graph for which a stage's storage-by-storage count can differ
    from its units' sum of ``saved_bytes``, grouped by the units involved (empty where the
    profile has no storage ids, or every storage stays within one unit)."""
    graph = units.graph
    savers: dict[str, set[int]] = {}
    first: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for key, size in node.saved.items():
            savers.setdefault(key, set()).add(units.unit_of[i])
            first.setdefault(key, units.unit_of[i])  # nodes in graph order: the first saver
            nbytes[key] = size
    owner: dict[str, int | None] = {}
    readers = graph.users()
    for i, node in enumerate(graph.nodes):
        shared = is_parameter(node) and len({units.unit_of[r] for r in readers[i]}) > 1
        for name in node.params:  # a shared parameter is held by every stage reading it
            owner[f"param:{name}"] = None if shared else units.unit_of[i]
    grouped: dict[tuple[tuple[int, ...], int | None, int | None], int] = {}
    for key, held in savers.items():
        if key.startswith("param:"):
            if key in owner and (owner[key] is None or held == {owner[key]}):
                continue  # owned wherever it is saved
            shape = (tuple(sorted(held)), None, owner.get(key))
        else:
            if len(held) == 1:
                continue  # one unit: counted once, where it is
            shape = (tuple(sorted(held)), first[key], None)
        grouped[shape] = grouped.get(shape, 0) + nbytes[key]
    return [Overlap(size, *shape) for shape, size in grouped.items()]


def excess(found: list[Overlap], before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Bytes per micro-batch that the stage ``after[j] \\ before[i]`` saves beyond its units'
    sum of ``saved_bytes``, as ``[i, j]`` (meaningful where ``before[i]`` is a subset of
    ``after[j]``; boolean matrices, one row per set of units, one column per unit); zeros
    where ``found`` is empty."""
    out = np.zeros((len(before), len(after)))
    for o in found:
        count_before = before[:, list(o.savers)].sum(axis=1)
        count_after = after[:, list(o.savers)].sum(axis=1)
        held = count_after[None, :] > count_before[:, None]
        if o.owner is not None:
            held &= ~(after[None, :, o.owner] & ~before[:, None, o.owner])
        counted = (
            after[None, :, o.first] & ~before[:, None, o.first]
            if o.first is not None
            else np.zeros_like(held)
        )
        out += o.nbytes * (held.astype(float) - counted)
    return out


def prefixes(units: Units) -> np.ndarray:
    """The prefixes of the unit order as sets of units (row ``a``: the units before ``a``), for
    :func:`excess` over contiguous splits."""
    n = len(units)
    return np.tri(n + 1, n, -1, dtype=bool)
