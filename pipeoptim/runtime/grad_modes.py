"""The modes the stages' training actions run in, whatever the caller's.

torch keeps gradient, inference and autocast modes per thread. The local executor, and rank 0
under torchrun, run stages in the thread that calls ``step()``, ``flush()`` or ``predict()``;
the processes executor's workers run them in threads of their own, where none of the caller's
modes reaches. A flush inside the caller's ``torch.inference_mode()`` (``predict`` flushes
first) made SGD's momentum buffer an inference tensor, which the next step could not update
("Inplace update to inference tensor outside InferenceMode"), and one inside a caller's
``torch.autocast`` ran a backward and step in bfloat16 (weights 0.02 off, helper-148). So
every executor runs its training actions under :func:`training_modes`. A stage's own autocast
(``precision=``) is entered inside it and applies as always.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from pipeoptim.autograd_modes import profiling_modes

#: device types whose autocast the caller may have on
_AUTOCAST_DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def training_modes() -> Iterator[None]:
    """The compiler's :func:`~pipeoptim.autograd_modes.profiling_modes` (gradients on,
    inference mode off, saved-tensor hooks allowed) and the caller's autocast off, restored
    on exit; also a decorator."""
    with profiling_modes(), callers_autocast_off():
        yield


@contextlib.contextmanager
def callers_autocast_off() -> Iterator[None]:
    """The caller's autocast off for each device type where it is on (a stage's own, from
    ``precision=``, is entered inside and applies); also a decorator: ``predict``'s forward
    under a caller's autocast ran in bfloat16 in this process's stages alone (helper-180)."""
    with contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
