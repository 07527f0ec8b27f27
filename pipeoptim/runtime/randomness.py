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
import re
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn

#: names of torch's operations and modules that draw, or may (scaled_dot_product_attention's
#: dropout_p, MultiheadAttention's dropout): a false match only costs the seeding
RANDOM_NAMES = re.compile(
    r"rand|dropout|bernoulli|normal|uniform|multinomial|poisson|exponential|geometric|cauchy|"
    r"gumbel|rrelu|fractional|attention|seed|rng|generator",
    re.IGNORECASE,
)
#: modules whose functions are pure where their names are (``operator.getitem``, ``getattr``)
PLAIN_MODULES = ("_operator", "operator", "builtins", "math")


def draws_random_numbers(module: nn.Module) -> bool:
    """Whether a forward of ``module`` (a stage's ``torch.fx`` graph module) may draw from
    torch's random generators: ``True`` for anything but a graph module whose every call is a
    torch (or ``operator``, ``builtins``, ``math``) function, a tensor method or a
    ``torch.nn`` module (with all its children), none of them named like a random operation
    (:data:`RANDOM_NAMES`), and whose nested graph modules are alike."""
    if not isinstance(module, fx.GraphModule):
        return True
    for node in module.graph.nodes:
        if node.op == "call_function" and _draws_function(node.target):
            return True
        if node.op == "call_method" and RANDOM_NAMES.search(str(node.target)):
            return True
        if node.op == "call_module" and _draws_module(module.get_submodule(str(node.target))):
            return True
    return False


def _draws_function(target: object) -> bool:
    owner = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    known = owner in PLAIN_MODULES or owner == "torch" or owner.startswith("torch.")
    return not known or bool(RANDOM_NAMES.search(name))


def _draws_module(module: nn.Module) -> bool:
    if isinstance(module, fx.GraphModule):
        return draws_random_numbers(module)
    return any(
        not type(m).__module__.startswith("torch.nn.modules.") or RANDOM_NAMES.search(type(m).__name__)
        for m in module.modules()
    )


@contextlib.contextmanager
def seeded(value: int | None, devices: Sequence[torch.device]) -> Iterator[None]:
    """Within: torch's CPU generator and those of the CUDA ``devices`` seeded with ``value``,
    the caller's restored after (``torch.random.fork_rng``); nothing where ``value`` is
    ``None`` (a stage that draws nothing, :func:`draws_random_numbers`)."""
    if value is None:
        yield
        return
    with torch.random.fork_rng(devices=list(devices)):
        torch.default_generator.manual_seed(value)  # torch.manual_seed would seed every accelerator type
        for device in devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(value)
        yield
