"""pipeoptim: compile an ``nn.Module`` and its optimizer into an asynchronous pipeline-parallel
trainer with PipeOptim weight prediction (Guan et al., arXiv:2312.00839) and the baselines
GPipe, 1F1B, PipeDream, PipeDream-2BW and SpecTrain.

The names below are imported on first use (PEP 562), so that ``import pipeoptim.cli.entry``
does not import torch: the command line handles Ctrl-C before torch's import begins."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeoptim.compile_pipeline import compile
    from pipeoptim.compiler.plan import Plan
    from pipeoptim.errors import (
        BatchRefusedError,
        CheckpointError,
        CodegenError,
        InfeasibleMemoryError,
        NonFiniteLossError,
        PeerLostError,
        PipelineError,
        PipeoptimError,
        PlanError,
        PredictorError,
        ProfileError,
        RanksInOtherCallsError,
        TraceError,
    )
    from pipeoptim.loss import Loss
    from pipeoptim.methods import METHODS
    from pipeoptim.pipeline import Pipeline
    from pipeoptim.runtime.predictors import register_predictor

#: each public name and the module that defines it
_WHERE = {
    "METHODS": "pipeoptim.methods",
    "BatchRefusedError": "pipeoptim.errors",
    "CheckpointError": "pipeoptim.errors",
    "CodegenError": "pipeoptim.errors",
    "InfeasibleMemoryError": "pipeoptim.errors",
    "Loss": "pipeoptim.loss",
    "NonFiniteLossError": "pipeoptim.errors",
    "PeerLostError": "pipeoptim.errors",
    "Pipeline": "pipeoptim.pipeline",
    "PipelineError": "pipeoptim.errors",
    "PipeoptimError": "pipeoptim.errors",
    "Plan": "pipeoptim.compiler.plan",
    "PlanError": "pipeoptim.errors",
    "PredictorError": "pipeoptim.errors",
    "ProfileError": "pipeoptim.errors",
    "RanksInOtherCallsError": "pipeoptim.errors",
    "TraceError": "pipeoptim.errors",
    "compile": "pipeoptim.compile_pipeline",
    "register_predictor": "pipeoptim.runtime.predictors",
}
__all__ = [
    "METHODS",
    "BatchRefusedError",
    "CheckpointError",
    "CodegenError",
    "InfeasibleMemoryError",
    "Loss",
    "NonFiniteLossError",
    "PeerLostError",
    "Pipeline",
    "PipelineError",
    "PipeoptimError",
    "Plan",
    "PlanError",
    "PredictorError",
    "ProfileError",
    "RanksInOtherCallsError",
    "TraceError",
    "compile",
    "register_predictor",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (``pipeoptim.compile_layout`` after ``import
    pipeoptim``, as when this package imported them all), on first use.

    Raises:
        AttributeError: ``name`` is neither (a dotted or otherwise impossible name too).
    """
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif (
        name.isidentifier()
        and not name.startswith("__")
        and importlib.util.find_spec(f"{__name__}.{name}") is not None
    ):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r}", name=name, obj=sys.modules[__name__]
        )
    globals()[name] = value  # the next use is a plain attribute
    return value


def __dir__() -> list[str]:
    """The public names, ``__version__`` and the submodules (not this module's helpers)."""
    return sorted({*__all__, "__version__", *(m.name for m in pkgutil.iter_modules(__path__))} - {"__main__"})
