"""Profiles cached on disk: ``<profile_dir>/<model>-<key hash>.json``, reused only for the same
key (:func:`pipeoptim.compiler.profile_key.profile_key`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.profile import profile_model
from pipeoptim.compiler.profile_key import profile_key
from pipeoptim.compiler.trace import TracedModel
from pipeoptim.errors import ProfileError


def load_or_profile(
    traced: TracedModel,
    example_inputs: Sequence[torch.Tensor],
    *,
    profile_dir: str | Path | None = "profiles",
    device: torch.device | str | None = None,
    warmup: int = 2,
    repeats: int = 5,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[CostGraph, bool]:
    """Return a saved profile with the same key, or measure and save a new one.

    The file is ``<profile_dir>/<model>-<key hash>.json``. A profile of the same model with
    another key is never reused: ``log`` says which part of the key changed, then the model is
    profiled again. An unreadable file is reported through ``log`` and replaced.

    Returns:
        ``(cost graph, reused)``.
    """
    device = torch.device(device) if device is not None else example_inputs[0].device
    key = profile_key(traced, example_inputs, device)
    if profile_dir is None:
        return profile_model(traced, example_inputs, device=device, warmup=warmup, repeats=repeats), False
    folder = Path(profile_dir)
    probe = CostGraph(model=traced.model_name, nodes=[], batch_size=0, key=key)
    path = folder / f"{traced.model_name}-{probe.key_hash}.json"
    if path.exists():
        try:
            graph = CostGraph.load(path)
        except ProfileError as exc:
            log(f"not reusing {path}: {exc}")
        else:
            if graph.key == key:
                log(f"reusing profile {path} (same graph, inputs, device and torch version)")
                return graph, True
            log(f"not reusing {path}: its key differs ({_key_diff(graph.key, key)})")
    else:
        for other in sorted(folder.glob(f"{traced.model_name}-*.json")):
            try:
                old = CostGraph.load(other)
            except ProfileError:
                continue
            diff = _key_diff(old.key, key)
            log(f"profiling anew: no saved profile matches ({diff}, against the saved {other.name})")
            break
    graph = profile_model(traced, example_inputs, device=device, warmup=warmup, repeats=repeats)
    graph.save(path)
    log(f"saved profile {path} ({graph.info['profile_wall_s']:.2f} s to measure)")
    return graph, False


def _key_diff(old: dict, new: dict) -> str:
    names = {
        "graph_hash": "model graph",
        "inputs": "input shapes/dtypes",
        "device": "device",
        "torch": "torch version",
        "measures": "profiler version",
        "threads": "CPU threads",
    }
    diffs = [
        f"{names.get(k, k)}: saved {old.get(k)!s:.60}, now {new.get(k)!s:.60}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return "; ".join(diffs) or "same key"
