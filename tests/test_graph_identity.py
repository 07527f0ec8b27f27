"""What keys a profile (pipeoptim.compiler.graph_identity): every module that runs its own
forward, built-in leaves included, with its mode and state (helper-115: attention of 64 heads
reused the profile of 1 head, a dropout in eval mode that of one in training, a leaf's cache
of 256 x 16384 values that of 256 x 64)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeoptim.compiler.trace import trace


class Attention(nn.Module):
    def __init__(self, heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, heads, dropout=dropout, batch_first=True)
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x, x, x, need_weights=False)[0])


class Recurrent(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.lstm = nn.LSTM(64, 64, batch_first=batch_first)
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(x)[0])


def _normed(p: float = 0.1, eps: float = 1e-5, eval_dropout: bool = False) -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(8, eps=eps), nn.Dropout(p), nn.Linear(64, 4))
    if eval_dropout:
        model[2].eval()
    return model


@dataclasses.dataclass
class Config:
    iterations: int = 1


@dataclasses.dataclass(slots=True)
class SlottedConfig:
    iterations: int = 1


def _repeat(f: Callable, x: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = f(x)
    return x


def _times(n: int) -> Callable:
    return lambda f, x: _repeat(f, x, n)


class Leaf(nn.Module):
    """A user's leaf whose work follows state that is not a plain attribute."""

    def __init__(
        self,
        config: object = None,
        count: object = 1,
        cache: int = 64,
        table: int = 64,
        rounds: Callable | None = None,
        dtype: torch.dtype = torch.float32,
        **extra: object,
    ) -> None:
        super().__init__()
        self.config = config or Config()
        self.count = count
        self.register_buffer("cache", torch.zeros(8, cache), persistent=False)
        self.table = torch.zeros(table)
        self.lin = nn.Linear(64, 64)
        self._rounds = rounds or functools.partial(_repeat, n=1)
        self.dtype = dtype
        vars(self).update(extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.config.iterations * int(self.count)):  # type: ignore[attr-defined]
            x = self._rounds(lambda h: torch.tanh(self.lin(h.to(self.dtype)).float()), x)
        return x + self.cache.sum() + self.table.sum()


def _with_leaf(**options: object) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), Leaf(**options))  # type: ignore[arg-type]


def _odd() -> nn.Module:
    """A leaf whose attributes have no stable ``repr`` (functions as keys: an address; a
    frozenset: hash order) or none to take (a numpy array: helper-117's crash)."""
    return _with_leaf(
        gains={torch.tanh: 1.0, torch.relu: 2.0}, names=frozenset("abcdefgh"), anchors=np.ones(4)
    )


def _hash(model: nn.Module, leaves: tuple[str, ...] = ()) -> str:
    return trace(model, torch.randn(2, 8, 64), leaf_modules=list(leaves)).graph_hash


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[str, ...]]] = {
    "attention heads": (lambda: Attention(1), lambda: Attention(64), ()),
    "attention dropout": (lambda: Attention(dropout=0.0), lambda: Attention(dropout=0.5), ()),
    "lstm batch_first": (lambda: Recurrent(True), lambda: Recurrent(False), ()),
    "dropout p": (lambda: _normed(p=0.0), lambda: _normed(p=0.5), ()),
    "dropout in eval mode": (_normed, lambda: _normed(eval_dropout=True), ()),
    "batch norm eps": (_normed, lambda: _normed(eps=1e-3), ()),
    "a leaf's config dataclass": (_with_leaf, lambda: _with_leaf(config=Config(50)), ("1",)),
    "a leaf's numpy number": (
        lambda: _with_leaf(count=np.int64(1)),
        lambda: _with_leaf(count=np.int64(50)),
        ("1",),
    ),
    "a leaf's non-persistent buffer": (_with_leaf, lambda: _with_leaf(cache=16384), ("1",)),
    "a leaf's tensor attribute": (_with_leaf, lambda: _with_leaf(table=16384), ("1",)),
    "a leaf's private partial": (
        _with_leaf,
        lambda: _with_leaf(rounds=functools.partial(_repeat, n=60)),
        ("1",),
    ),
    "a leaf's closure": (lambda: _with_leaf(rounds=_times(1)), lambda: _with_leaf(rounds=_times(60)), ("1",)),
    "a leaf's dtype": (_with_leaf, lambda: _with_leaf(dtype=torch.float64), ("1",)),
    "a leaf's slotted config": (
        lambda: _with_leaf(config=SlottedConfig(1)),
        lambda: _with_leaf(config=SlottedConfig(50)),
        ("1",),
    ),
    "a leaf's set": (lambda: _with_leaf(names={"a", "b"}), lambda: _with_leaf(names={"a", "c"}), ("1",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_changes_a_leafs_work_changes_the_hash(case: str) -> None:
    before, after, leaves = CASES[case]
    assert _hash(before(), leaves) == _hash(before(), leaves)  # the same model: the same key
    assert _hash(before(), leaves) != _hash(after(), leaves)


def test_a_class_without_source_is_keyed_by_its_code() -> None:
    """A class defined in ``python -c``, ``python -`` or a notebook has no source to read: its
    forward's edits went unseen (a 1-iteration profile priced a 60-iteration forward)."""

    def leaf_class(times: int) -> type:
        scope: dict = {"nn": nn, "torch": torch}
        exec(
            "class Made(nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            "        self.lin = nn.Linear(64, 64)\n"
            "    def forward(self, x):\n"
            f"        for _ in range({times}):\n"
            "            x = torch.tanh(self.lin(x))\n"
            "        return x\n",
            scope,
        )
        return scope["Made"]

    def model(made: type) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), made())

    once, sixty = leaf_class(1), leaf_class(60)
    assert _hash(model(once), ("1",)) == _hash(model(leaf_class(1)), ("1",))
    assert _hash(model(once), ("1",)) != _hash(model(sixty), ("1",))


def test_the_hash_is_the_same_in_another_process() -> None:
    """Profiles are reused across runs: nothing of one process (an address) is in the key."""
    code = (
        f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); torch.manual_seed(1)\n"
        "from test_graph_identity import _hash, _with_leaf, Attention, _normed\n"
        "from test_graph_identity import _odd\n"
        "print(_hash(_with_leaf(), ('1',)), _hash(Attention()), _hash(_normed()), _hash(_odd(), ('1',)))"
    )
    hashes = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout]
    hashes += [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    ]
    here = f"{_hash(_with_leaf(), ('1',))} {_hash(Attention())} {_hash(_normed())} {_hash(_odd(), ('1',))}\n"
    assert hashes == [here, here]


WRAPPED = """
import torch
from torch import nn
from wrapped_step import step

REPEAT = 1


@torch.fx.wrap
def heavy(x):
    for _ in range(REPEAT * {times}):
        x = step(x)
    return x


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return heavy(self.lin(x))
"""


def _load(folder: Path, name: str, source: str) -> types.ModuleType:
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _wrapped_model(folder: Path, times: int, repeat: int = 1, step: str = "torch.tanh(x)") -> nn.Module:
    """A model from a file of its own whose forward calls ``heavy``, a ``torch.fx.wrap``
    function the graph calls whole, running ``REPEAT * times`` rounds of ``step``, a helper
    imported from another file."""
    _load(folder, "wrapped_step", f"import torch\n\ndef step(x):\n    return {step}\n")
    module = _load(folder, "wrapped", WRAPPED.format(times=times))  # one file, edited between imports
    module.REPEAT = repeat  # a setting computed at import: the file's text stays the same
    torch.manual_seed(0)
    return module.Wrapped()


def test_a_wrapped_function_is_keyed_by_its_code_and_the_settings_it_reads(tmp_path: Path) -> None:
    """The graph holds only the call ``heavy(x)``: an edited helper, or one reading a setting
    computed at import, reused the profile of the old one (133x too fast; helper-129)."""
    assert "heavy" in trace(_wrapped_model(tmp_path, 1), torch.randn(2, 8, 64)).gm.code
    once = _hash(_wrapped_model(tmp_path, 1))
    assert _hash(_wrapped_model(tmp_path, 1)) == once
    assert _hash(_wrapped_model(tmp_path, 300)) != once
    assert _hash(_wrapped_model(tmp_path, 1, repeat=300)) != once
    assert _hash(_wrapped_model(tmp_path, 1, step="torch.tanh(x @ x.mT @ x)")) != once


ROUNDS = 1  # a module-level setting a leaf's forward reads


class RoundsLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(ROUNDS):
            x = torch.tanh(self.lin(x))
        return x


def test_a_setting_a_leaf_reads_from_its_module_changes_the_hash(monkeypatch) -> None:
    """The file's text is the same whatever ``ROUNDS = int(os.environ[...])`` gave at import."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), RoundsLeaf())
    before = _hash(model, ("1",))
    monkeypatch.setattr(sys.modules[__name__], "ROUNDS", 50)
    assert _hash(model, ("1",)) != before


LEAF_READING = """import torch
import {module}


class Leaf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        for _ in range({module}.REPEAT):
            x = torch.tanh(self.lin(x))
        return x
"""


def _changes_the_hash(tmp_path: Path, module: types.ModuleType) -> bool:
    """Whether setting ``module.REPEAT`` from 1 to 20 changes the hash of a model whose leaf
    reads it as ``<module>.REPEAT``."""
    leaf = _load(
        tmp_path,
        f"leaf_reading_{module.__name__.replace('.', '_')}",
        LEAF_READING.format(module=module.__name__),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), leaf.Leaf())
    module.REPEAT = 1
    before = _hash(model, ("1",))
    assert _hash(model, ("1",)) == before
    module.REPEAT = 20
    return _hash(model, ("1",)) != before


def test_a_setting_a_leaf_reads_through_the_users_module_changes_the_hash(tmp_path: Path) -> None:
    """``import cfg`` ... ``range(cfg.REPEAT)``: the profile of REPEAT = 1 was reused after
    cfg.py said 20 (18x too fast; helper-136). Now ``cfg.REPEAT`` counts as ``REPEAT`` does."""
    assert _changes_the_hash(tmp_path, _load(tmp_path, "leaf_cfg", "REPEAT = 1\n"))


def test_a_setting_read_through_a_namespace_packages_submodule_changes_the_hash(
    tmp_path: Path, monkeypatch
) -> None:
    """``import leaf_ns.settings`` ... ``leaf_ns.settings.REPEAT``: a package's submodule is a
    module too, and a namespace package has no ``__file__`` (helper-139)."""
    (tmp_path / "leaf_ns").mkdir()
    (tmp_path / "leaf_ns" / "settings.py").write_text("REPEAT = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert _changes_the_hash(tmp_path, importlib.import_module("leaf_ns.settings"))


CALLED = 0  # a counter a leaf's forward keeps
SEEN: list[int] = []  # a list it appends to


class CountingLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global CALLED
        CALLED += 1
        SEEN.append(CALLED)
        return torch.tanh(self.lin(x))


def test_state_a_leaf_changes_or_could_change_leaves_the_hash_alone(monkeypatch) -> None:
    """Its own counter and a mutable list moved between the driver's trace and a worker's
    (profiling runs the forward): keyed, the worker refused the plan as another graph's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), CountingLeaf())
    before = _hash(model, ("1",))
    model(torch.randn(2, 8, 64))
    monkeypatch.setattr(sys.modules[__name__], "SEEN", [5, 6, 7])
    assert _hash(model, ("1",)) == before
