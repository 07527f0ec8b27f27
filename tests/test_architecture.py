"""The package's layering, read from the source with ``ast``, and the executor interface.

Every import counts: at module level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeoptim"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The pipeoptim modules ``name`` imports (``from pkg import mod`` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among modules (not counting a package and its own submodules), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def edges(name: str) -> set[str]:
        return {t for t in graph[name] if not t.startswith(name + ".") and not name.startswith(t + ".")}

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for target in sorted(edges(name)):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_import_walk_sees_function_level_imports() -> None:
    """The walk finds imports inside functions (the kind that hid cycles before)."""
    graph = _graph()
    assert "pipeoptim.runtime.spmd" in graph["pipeoptim.runtime.launch"]  # imported inside a function
    assert "pipeoptim.runtime.worker" in graph["pipeoptim.runtime.distributed"]
    assert "pipeoptim.microbatch" in graph["pipeoptim.pipeline"]  # ``from pipeoptim import microbatch``


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle() -> None:
    assert _cycle(_graph()) is None


def test_compiler_does_not_import_runtime() -> None:
    offending = {
        name: sorted(t for t in targets if t.startswith("pipeoptim.runtime"))
        for name, targets in _graph().items()
        if name.startswith("pipeoptim.compiler")
    }
    assert {name: t for name, t in offending.items() if t} == {}


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name: str) -> None:
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (over {MAX_LINES}): split it by concept"


def test_every_executor_implements_the_protocol() -> None:
    """Local (one replica or several), process and torchrun executors have every method of
    ``Executor``, with the same parameter names, so the pipeline never probes them with ``getattr``."""
    from pipeoptim.runtime.distributed import ProcessExecutor
    from pipeoptim.runtime.executor import LocalExecutor
    from pipeoptim.runtime.launch import Executor
    from pipeoptim.runtime.replicas import ReplicatedLocalExecutor
    from pipeoptim.runtime.spmd import SPMDExecutor

    wanted = {
        name: list(inspect.signature(fn).parameters)
        for name, fn in vars(Executor).items()
        if inspect.isfunction(fn) and not name.startswith("_")
    }
    assert len(wanted) == 19
    for cls in (LocalExecutor, ReplicatedLocalExecutor, ProcessExecutor, SPMDExecutor):
        have = {
            name: list(inspect.signature(getattr(cls, name)).parameters)
            for name in wanted
            if hasattr(cls, name)
        }
        assert have == wanted, cls.__name__


def test_the_package_and_the_console_script_load_torch_only_when_used() -> None:
    """``import pipeoptim`` and the console script's module import no torch (1-3 s), so that a
    Ctrl-C during torch's import reaches the command line's handler; every public name and
    every submodule is there on first use (``pipeoptim.compile_layout`` after ``import
    pipeoptim``: a benchmark used it), and ``from pipeoptim import *`` gives the names. A
    dotted name is an AttributeError (``hasattr`` raised ModuleNotFoundError), and ``dir``
    lists the package's names, not the helpers ``__getattr__`` imports."""
    code = (
        "import sys, pipeoptim, pipeoptim.cli.entry\n"
        "import pkgutil\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('pipeoptim'))\n"
        "assert set(pipeoptim.__all__) <= set(dir(pipeoptim))\n"
        "namespace = {}\n"
        "exec('from pipeoptim import *', namespace)\n"
        "print(sorted(set(namespace) - {'__builtins__'}) == sorted(pipeoptim.__all__))\n"
        "print(callable(pipeoptim.compile))\n"
        "modules = [m.name for m in pkgutil.iter_modules(pipeoptim.__path__) if m.name != '__main__']\n"
        "print(all(getattr(pipeoptim, m).__name__ == f'pipeoptim.{m}' for m in modules))\n"
        "print(not hasattr(pipeoptim, 'errors.x') and {'importlib', 'Any'}.isdisjoint(dir(pipeoptim)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True", "True", "True"]
