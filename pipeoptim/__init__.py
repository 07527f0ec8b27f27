"""pipeoptim: compile an ``nn.Module`` and its optimizer into an asynchronous pipeline-parallel
trainer with PipeOptim weight prediction (Guan et al., arXiv:2312.00839) and the baselines
GPipe, 1F1B, PipeDream, PipeDream-2BW and SpecTrain."""

from pipeoptim.compile_pipeline import compile
from pipeoptim.compiler.plan import Plan
from pipeoptim.errors import (
    CheckpointError,
    CodegenError,
    InfeasibleMemoryError,
    NonFiniteLossError,
    PipelineError,
    PipeoptimError,
    PlanError,
    PredictorError,
    ProfileError,
    TraceError,
)
from pipeoptim.loss import Loss
from pipeoptim.methods import METHODS
from pipeoptim.pipeline import Pipeline
from pipeoptim.runtime.predictors import register_predictor

__all__ = [
    "METHODS",
    "CheckpointError",
    "CodegenError",
    "InfeasibleMemoryError",
    "Loss",
    "NonFiniteLossError",
    "Pipeline",
    "PipelineError",
    "PipeoptimError",
    "Plan",
    "PlanError",
    "PredictorError",
    "ProfileError",
    "TraceError",
    "compile",
    "register_predictor",
]
__version__ = "0.1.0"
