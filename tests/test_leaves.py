"""The fast paths on every action's way (pipeoptim.runtime.leaves, DistChannel's cached
gradient layout, microbatch.split) give exactly what the general code they skip gives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils import _pytree as pytree

from pipeoptim import microbatch
from pipeoptim.microbatch import Rows
from pipeoptim.runtime.comm import DistChannel
from pipeoptim.runtime.layout import grad_layout
from pipeoptim.runtime.leaves import detach_values, flatten

X, Y = torch.randn(2, 3, requires_grad=True), torch.arange(4)
VALUES = {
    "tuple of tensors": (X, Y),
    "one-tensor tuple": (X,),
    "empty tuple": (),
    "nested": ((X, [Y, 3]), {"a": X}),
    "with a number": (X, 5),
    "list": [X, Y],
    "tensor": X,
    "parameter": torch.nn.Parameter(torch.randn(2)),
}


@pytest.mark.parametrize("name", list(VALUES))
def test_flatten_gives_the_tree_walks_leaves_and_rebuilds_the_same_structure(name: str) -> None:
    value = VALUES[name]
    leaves, rebuild = flatten(value)
    expected, spec = pytree.tree_flatten(value)
    assert len(leaves) == len(expected) and all(a is b for a, b in zip(leaves, expected))
    new = [v * 2 if isinstance(v, torch.Tensor) else v for v in leaves]
    rebuilt = rebuild(new)
    assert pytree.tree_structure(rebuilt) == spec
    assert all(a is b for a, b in zip(pytree.tree_leaves(rebuilt), new))


@pytest.mark.parametrize("name", list(VALUES))
def test_detach_values_detaches_every_tensor_and_keeps_the_structure(name: str) -> None:
    value = VALUES[name]
    out = detach_values(value)
    assert pytree.tree_structure(out) == pytree.tree_structure(value)
    for got, was in zip(pytree.tree_leaves(out), pytree.tree_leaves(value)):
        if isinstance(was, torch.Tensor):
            assert not got.requires_grad and got.data_ptr() == was.data_ptr()
        else:
            assert got is was


def test_the_cached_gradient_layout_is_grad_layouts_for_each_rows_and_length() -> None:
    """One layout per (rows, sequence length): Rows compare as their rows alone, so a cache
    keyed on them would give a micro-batch of another length the wrong buffer."""
    follows = {"at": 10, "slopes": [0, 1, 0]}
    meta = {"kind": "tensor", "dtype": "float32", "shape": [8, 10, 4], "batch_dim": 0, "length": follows}
    plan = SimpleNamespace(
        batch_size=8,
        values={"h": {"meta": [meta]}, "o": {"meta": [meta]}},
        io=[SimpleNamespace(inputs=[], outputs=["h"]), SimpleNamespace(inputs=["h"], outputs=["o"])],
    )
    channel = DistChannel(1, 3, plan, [True], [True], 5.0, torch.device("cpu"))
    for batch in [Rows(4, 10), Rows(4, 7), Rows(8, 7), 4, Rows(4, 10)]:
        for side in ("in", "out"):
            assert channel._layout(side, batch) == grad_layout([meta], [True], 8, batch)
    assert channel._layout("in", Rows(4, 7))[0][0][3] == [4, 7, 4]
    assert channel._layout("in", Rows(4, 10))[0][0][3] == [4, 10, 4]


@pytest.mark.parametrize("name", [*VALUES, "0-dim tensor in a tuple", "tuple subclass"])
def test_split_gives_the_tree_walks_parts(name: str) -> None:
    """A tensor and a tuple of tensors (what step() splits at every mini-batch) skip the tree
    walk; everything else takes it."""
    value = {"0-dim tensor in a tuple": (X, torch.tensor(2.0)), "tuple subclass": torch.Size([4, 2])}.get(
        name, VALUES.get(name)
    )
    leaves, spec = pytree.tree_flatten(value)
    pieces = [
        list(torch.tensor_split(x, 2)) if isinstance(x, torch.Tensor) and x.dim() else [x] * 2 for x in leaves
    ]
    walked = [pytree.tree_unflatten([p[j] for p in pieces], spec) for j in range(2)]
    split = microbatch.split(value, 2)
    assert len(split) == 2
    for got, want in zip(split, walked):
        assert type(got) is type(want)
        got_leaves, got_spec = pytree.tree_flatten(got)
        assert got_spec == pytree.tree_flatten(want)[1]
        for a, b in zip(got_leaves, pytree.tree_leaves(want)):
            assert (
                (a.data_ptr(), a.shape) == (b.data_ptr(), b.shape) if isinstance(a, torch.Tensor) else a == b
            )
