"""Mixed precision: every stage computes under ``torch.autocast`` (``compile(..., autocast=)``).

Each stage's forward and the last stage's loss run inside ``torch.autocast(device_type,
dtype)``, as the plain model would with its forward and loss inside that context, so the
values crossing a stage boundary have the dtypes autocast gives them there (a ``Linear``'s
output in bfloat16: half the bytes of float32). The compiler profiles the model under the same
context, so the plan's boundary dtypes and byte counts (communication and saved activations)
are those of the reduced precision, and the profile is cached apart from a float32 one.
Autocast state is per thread and per process; this is why a spawned worker does not follow a
caller's ``with torch.autocast(...)`` and the option exists.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

#: Reduced-precision dtypes the option accepts (float16 with loss scaling,
#: :mod:`pipeoptim.runtime.scaler`).
SUPPORTED = (torch.bfloat16, torch.float16)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """``--precision``: ``float32`` (no autocast), ``bfloat16`` or ``float16`` (with loss scaling).

    Raises:
        ValueError: another name.
    """
    dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be 'float32', 'bfloat16' or 'float16', not {precision!r}")
    return dtypes[precision]


def check_autocast(dtype: torch.dtype | None, model: torch.nn.Module | None = None) -> torch.dtype | None:
    """``dtype`` if supported, and for float16 (loss-scaled) if ``model``'s trainable
    parameters are not float16 themselves: ``torch.amp.GradScaler`` refuses to unscale float16
    gradients ("Attempting to unscale FP16 gradients"), whose small values the scaling exists
    to keep from flushing to zero.

    Raises:
        ValueError: another dtype, or float16 autocast of float16 parameters.
    """
    if dtype is torch.float16 and model is not None:
        half = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
        if half:
            raise ValueError(
                f"autocast=torch.float16 scales the loss for float32 parameters, but {half[0]} is float16 "
                "(torch.amp.GradScaler refuses to unscale float16 gradients): keep the parameters in "
                "float32 (model.float()), or use autocast=torch.bfloat16, which needs no loss scaling"
            )
    if dtype is None or dtype in SUPPORTED:
        return dtype
    raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, not {dtype!r}")


def autocast_context(dtype: torch.dtype | None, device: torch.device | str) -> Any:
    """``torch.autocast`` for ``device``'s type and ``dtype``; a null context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def under_autocast(
    fn: Callable[..., Any], dtype: torch.dtype, device: torch.device | str
) -> Callable[..., Any]:
    """``fn`` called inside :func:`autocast_context` (picklable: a ``functools.partial``)."""
    return functools.partial(_call_under_autocast, fn, dtype, str(torch.device(device).type))


def _call_under_autocast(
    fn: Callable[..., Any], dtype: torch.dtype, device_type: str, *args: Any, **kw: Any
) -> Any:
    with torch.autocast(device_type, dtype=dtype):
        return fn(*args, **kw)
