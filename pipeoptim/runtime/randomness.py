"""Whether a stage's forward may draw random numbers, and so needs its forwards seeded.

A stage reseeds torch's generator before each forward (from its seed, its index and the
micro-batch) so that dropout draws the same masks in every executor, and restores the caller's
generator afterwards (``torch.random.fork_rng``): 15-40 µs per forward on this project's CPU
host, against 1.5 ms for a forward of the throughput benchmark's MLP stage. A stage whose graph
holds nothing that may draw skips both: it draws nothing, so there is nothing to seed or
restore. The test is conservative: anything ``torch.fx`` cannot see into (a user's leaf
module, a wrapped function, a compiled stage) counts as drawing.
"""

from __future__ import annotations

import contextlib
import enum
import re
import types
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn

from pipeoptim.compiler.graph_identity import called_whole, global_names
from pipeoptim.compiler.trace import call_leaf
from pipeoptim.random_state import python_generators_seeded

#: names of torch's operations and modules that draw, or may (scaled_dot_product_attention's
#: dropout_p, MultiheadAttention's dropout): a false match only costs the seeding
RANDOM_NAMES = re.compile(
    r"rand|dropout|bernoulli|normal|uniform|multinomial|poisson|exponential|geometric|cauchy|"
    r"gumbel|rrelu|fractional|attention|seed|rng|generator",
    re.IGNORECASE,
)
#: modules whose functions are pure where their names are (``operator.getitem``, ``getattr``)
PLAIN_MODULES = ("_operator", "operator", "builtins", "math")


class Draws(enum.IntEnum):
    """What a stage's forward may draw from (:func:`draws_random_numbers`)."""

    NOTHING = 0  #: nothing: neither seeded nor forked
    TORCH = 1  #: torch's generators (dropout and the like)
    ANY = 2  #: code fx cannot see into (a user's leaf module or function): Python's and NumPy's too


def draws_random_numbers(module: nn.Module) -> Draws:
    """What a forward of ``module`` (a stage's ``torch.fx`` graph module) may draw from:
    :attr:`Draws.NOTHING` for a graph module whose every call is a torch (or ``operator``,
    ``builtins``, ``math``) function, a tensor method or a ``torch.nn`` module (with all its
    children), none of them named like a random operation (:data:`RANDOM_NAMES`), and whose
    nested graph modules are alike; :attr:`Draws.TORCH` where one is named so or a torch
    module runs as a leaf; :attr:`Draws.ANY` where user code runs (a module or function defined
    outside torch) or ``module`` is no graph module."""
    if not isinstance(module, fx.GraphModule):
        return Draws.ANY
    found = Draws.NOTHING
    for node in module.graph.nodes:
        if node.op == "call_function":
            found = max(found, _function_draws(node.target))
        elif node.op == "call_method" and RANDOM_NAMES.search(str(node.target)):
            found = max(found, Draws.TORCH)
    # modules run whole: called, or fetched for a leaf call or a recomputed region
    for name in called_whole(module):
        found = max(found, _module_draws(module.get_submodule(name)))
    return found


def _function_draws(target: object) -> Draws:
    if target is call_leaf:  # a leaf with parameters: at least torch's (LSTM's dropout); its module's code
        return Draws.TORCH  # counts as a module run whole (draws_random_numbers)
    owner = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    if not (owner in PLAIN_MODULES or owner == "torch" or owner.startswith("torch.")):
        return Draws.ANY if _python_draws(target) else Draws.TORCH
    return Draws.TORCH if RANDOM_NAMES.search(name) else Draws.NOTHING


def _module_draws(module: nn.Module) -> Draws:
    if isinstance(module, fx.GraphModule):
        return draws_random_numbers(module)
    found = Draws.NOTHING
    for m in module.modules():
        owner = type(m).__module__
        if not owner.startswith("torch."):  # a user's class: its own methods, and its bases'
            own = [c for c in type(m).__mro__ if not c.__module__.startswith(("torch.", "builtins"))]
            if any(_python_draws(f) for c in own for f in vars(c).values()):
                return Draws.ANY
            found = Draws.TORCH
            continue
        if not owner.startswith("torch.nn.modules.") or RANDOM_NAMES.search(type(m).__name__):
            found = Draws.TORCH
    return found


#: the modules whose global generators :attr:`Draws.ANY` seeds
_GENERATORS = ("random", "numpy")


def _python_draws(fn: object, depth: int = 2) -> bool:
    """Whether ``fn``'s code (or, ``depth`` calls deep, a function it calls by a module-level
    name) names Python's ``random`` or NumPy, or a function or method of theirs
    (``random.random``, ``from random import random``, ``np.random.rand``): a user's leaf
    without such a name cannot draw from their global generators, so seeding them (80-160 us
    per forward, most of it NumPy's state) is left out (helper-131)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    names, _ = global_names(code)
    scope = getattr(fn, "__globals__", {})
    for name in names:
        value = scope.get(name)
        if value is None:
            continue
        if isinstance(value, types.ModuleType):
            if value.__name__.split(".")[0] in _GENERATORS:
                return True
            continue
        owner = type(getattr(value, "__self__", None)).__module__ if hasattr(value, "__self__") else None
        owner = owner or getattr(value, "__module__", None) or ""
        if callable(value) and owner.split(".")[0] in _GENERATORS:
            return True
        if depth > 1 and isinstance(value, types.FunctionType) and _python_draws(value, depth - 1):
            return True
    return False


@contextlib.contextmanager
def seeded(value: int | None, devices: Sequence[torch.device], python: bool = False) -> Iterator[None]:
    """Within: torch's CPU generator and those of the CUDA ``devices`` seeded with ``value``,
    the caller's restored after (``torch.random.fork_rng``, 4 us); with ``python``
    (:attr:`Draws.ANY`) Python's global ``random`` generator and NumPy's ``np.random`` too, so
    that a leaf module drawing from them (stochastic depth with ``random.random()``) draws
    the same in every executor (80 us more, most of it NumPy's state); nothing where ``value``
    is ``None`` (a stage that draws nothing, :func:`draws_random_numbers`)."""
    if value is None:
        yield
        return
    python_seeded = python_generators_seeded(value) if python else contextlib.nullcontext()
    with torch.random.fork_rng(devices=list(devices)), python_seeded:
        torch.default_generator.manual_seed(value)  # torch.manual_seed would seed every accelerator type
        for device in devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(value)
        yield
