"""Autograd modes that both the compiler's profile and the stages' training need, whatever
the caller's (the compiler may not import the runtime): :func:`saved_tensor_hooks_allowed`
and :func:`profiling_modes`, which the stages' :func:`pipeoptim.runtime.grad_modes.
training_modes` enters with the caller's autocast off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def saved_tensor_hooks_allowed() -> Iterator[None]:
    """Undo a caller's ``torch.autograd.graph.disable_saved_tensors_hooks`` for the block
    (with the calls torch's own context manager makes), which the weight policies and the
    profile's saved-activation count rely on: a step, or a compile, inside it failed with the
    caller's message on the local executor alone (helper-180)."""
    said = torch._C._autograd._saved_tensors_hooks_get_disabled_error_message()
    if said is None:
        yield
        return
    torch._C._autograd._saved_tensors_hooks_enable()
    try:
        yield
    finally:
        torch._C._autograd._saved_tensors_hooks_disable(said)


@contextlib.contextmanager
def profiling_modes() -> Iterator[None]:
    """Gradients on, inference mode off and saved-tensor hooks allowed, restored on exit (the
    caller's autocast is kept: ``compile(autocast=...)`` profiles under its own); also a
    decorator. Under a caller's no_grad or inference mode the profile timed every backward
    as 0 s (and cached that); with the hooks disabled it failed."""
    with torch.inference_mode(False), torch.enable_grad(), saved_tensor_hooks_allowed():
        yield
