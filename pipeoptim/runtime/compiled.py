"""Compiled stages: every generated stage runs through ``torch.compile`` (``compile_stages=``).

Each process compiles its own stage's forward (the fx graph of :mod:`pipeoptim.compiler.codegen`;
the weight policy swaps the parameters' data outside it) with ``torch.compile(...,
backend=...)``; the backward is the compiled one AOTAutograd derives. Dynamo guards on the
input shapes: the first mini-batch of a new size (a last partial batch) compiles once more,
with dynamic shapes from then on. The weight policies' saved-tensor hooks apply to what the
compiled graph saves, as to any autograd function. ``inductor`` (the default) generates C++ on
the CPU and needs a C++ compiler; ``aot_eager`` runs the same traced graphs with eager kernels
(no compiler needed).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from pipeoptim.compiler.recompute import CheckpointRegion

#: ``compile_stages=True`` means this backend.
DEFAULT_BACKEND = "inductor"


def check_compile_stages(value: bool | str | None, device: torch.device | str) -> str | None:
    """The ``torch.compile`` backend ``compile_stages`` asks for, or ``None`` for eager stages.

    Args:
        value: ``False``/``None`` (eager), ``True`` (``inductor``) or a backend name from
            ``torch._dynamo.list_backends()`` (``"aot_eager"``, ...).
        device: where the stages run (inductor on the CPU needs a C++ compiler).

    Raises:
        ValueError: not a bool or a known backend name, or inductor without a C++ compiler
            for the CPU (the message names the fix).
    """
    if value is None or value is False:
        return None
    backend = DEFAULT_BACKEND if value is True else value
    if not isinstance(backend, str):
        raise ValueError(f"compile_stages must be True, False or a torch.compile backend name, not {value!r}")
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(
            f"compile_stages={backend!r} is not a torch.compile backend; use True (inductor) or one of "
            f"{', '.join(b for b in ('inductor', 'aot_eager', 'eager') if b in known)}"
        )
    if backend == "inductor" and torch.device(device).type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as exc:
            raise ValueError(
                "compile_stages with inductor on the CPU needs a C++ compiler (g++ or clang++), "
                f"and none was found ({type(exc).__name__}): install one (apt-get install g++), "
                "or use compile_stages='aot_eager' or leave it unset"
            ) from exc
    return backend


def compile_stage(module: nn.Module, backend: str) -> None:
    """Make ``module`` (a stage) run its forward through ``torch.compile`` with ``backend``.

    Checkpointed regions (:class:`~pipeoptim.compiler.recompute.CheckpointRegion`) stay eager
    (dynamo cannot trace their saved-tensor hooks and RNG state): the graph breaks around them.
    """
    for sub in module.modules():
        if isinstance(sub, CheckpointRegion):
            sub.forward = torch.compiler.disable(sub.forward)  # type: ignore[method-assign]
    forward = module.forward
    # inductor draws random numbers with its own kernels; fallback_random makes it call torch's,
    # from the stage's seeded generator, so dropout masks are those of eager stages
    options = {"fallback_random": True} if backend == "inductor" else None
    compiled = torch.compile(forward, backend=backend, options=options)
    module.forward = functools.wraps(forward)(compiled)  # type: ignore[method-assign]
