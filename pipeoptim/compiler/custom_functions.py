"""Custom ``torch.autograd.Function``s stop tracing, so that their own backward is kept.

``torch.fx`` traces *through* ``MyFunction.apply(x)``: the graph holds the operations of its
``forward`` and autograd then differentiates those, so the backward the user wrote (a
straight-through estimator, a gradient reversal, a fused kernel's hand-written gradient) is
silently replaced (a test Function whose backward raises trained without error). While a
model is traced (:func:`refusing_custom_functions`), ``apply`` of a Function defined outside
torch raises :class:`CustomFunctionCall`; the tracer then makes the module that called it a
leaf (:func:`pipeoptim.compiler.trace.trace`), whose forward runs as written at training time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class CustomFunctionCall(Exception):
    """A module's forward called a custom ``torch.autograd.Function`` while being traced."""

    def __init__(self, function: type) -> None:
        self.function = f"{function.__module__}.{function.__qualname__}"
        super().__init__(
            f"calls the custom autograd.Function {self.function}, whose own backward a traced graph "
            "would replace"
        )


@contextlib.contextmanager
def refusing_custom_functions() -> Iterator[None]:
    """Within: ``apply`` of an ``autograd.Function`` subclass not defined in torch raises
    :class:`CustomFunctionCall` (torch's own, e.g. reentrant checkpointing, run as usual)."""
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not cls.__module__.startswith("torch."):
            raise CustomFunctionCall(cls)
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.autograd.Function.apply = original  # type: ignore[method-assign]
