"""Profiles cached on disk: ``<profile_dir>/<model>-<key hash>.json``, reused only for the same
key (:func:`pipeoptim.compiler.profile_key.profile_key`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.profile import profile_model
from pipeoptim.compiler.profile_key import profile_key
from pipeoptim.compiler.trace import TracedModel
from pipeoptim.errors import ProfileError
from pipeoptim.units import plural


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
    profiled again. An unreadable file is reported through ``log`` and replaced; a profile that
    cannot be saved (a read-only folder) is used all the same, said through ``log``.

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
            if not graph.sealed:  # a hand edit of a well-formed value crashed a worker
                log(
                    f"not reusing {path}: it has no content_hash (written by an older pipeoptim, or "
                    "the field was removed)"
                )
            elif graph.key == key:
                log(f"reusing profile {path} (same graph, inputs, device and torch version)")
                return graph, True
            else:
                log(f"not reusing {path}: its key differs ({_key_diff(graph.key, key)})")
    else:
        _log_why_profiling(folder, traced.model_name, key, log)
    graph = profile_model(traced, example_inputs, device=device, warmup=warmup, repeats=repeats)
    try:
        graph.save(path)
    except OSError as exc:  # the run goes on with it: a read-only cache raised here (helper-115)
        log(
            f"profiled in {graph.info['profile_wall_s']:.2f} s, but could not save the profile in {path} "
            f"({exc}): this run uses it, the next profiles again; choose a writable profile folder"
        )
    else:
        log(f"saved profile {path} ({graph.info['profile_wall_s']:.2f} s to measure)")
    return graph, False


def _log_why_profiling(folder: Path, model: str, key: dict, log: Callable[[str], None]) -> None:
    """Say why ``model`` is profiled: no profile of it in ``folder`` yet, or only profiles for
    other keys. A first run profiles each micro-batch size its layouts need, and "no saved
    profile matches (input shapes ...)" read like a broken cache to a new user, as the two graph
    hashes did beside another model of the same class name (helper-99)."""
    saved = []
    for other in sorted(folder.glob(f"{model}-*.json")):
        try:
            saved.append((other.name, CostGraph.load(other).key))
        except ProfileError:
            continue
    now = _inputs_text(key.get("inputs"))
    if not saved:
        log(f"profiling {model} at inputs {now} (no saved profile of it in {folder})")
        return
    same_graph = [(name, old) for name, old in saved if old.get("graph_hash") == key.get("graph_hash")]
    if not same_graph:  # another model of that class name, or this one edited: no hashes to compare
        others = plural(len(saved), f"{model} profile")
        log(
            f"profiling {model} at inputs {now} (a model graph not profiled before; {folder} holds "
            f"{others} of other graphs: another model, or this one edited)"
        )
        return
    saved = same_graph
    if all(_key_diff(old, key, ignore=("inputs",)) == "same key" for _, old in saved):
        shapes = "; ".join(sorted({_inputs_text(old.get("inputs")) for _, old in saved}, key=_numbers))
        log(f"profiling {model} at inputs {now} (inputs not profiled before; profiles saved at {shapes})")
        return
    name, old = saved[0]
    log(f"profiling anew: no saved profile matches ({_key_diff(old, key)}, against the saved {name})")


def _inputs_text(inputs: object) -> str:
    """A profile key's ``inputs`` as ``4x16 float32, 4 int64`` (its text if not that shape)."""
    try:
        return ", ".join(f"{'x'.join(str(d) for d in shape) or 'scalar'} {dtype}" for shape, dtype in inputs)
    except (TypeError, ValueError):
        return f"{inputs!s:.60}"


def _numbers(text: str) -> list[int]:
    """The integers in ``text`` in order: shapes sort by their sizes (``8x32`` before ``16x32``)."""
    return [int(n) for n in re.findall(r"\d+", text)]


def _key_diff(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> str:
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
        if old.get(k) != new.get(k) and k not in ignore
    ]
    return "; ".join(diffs) or "same key"
