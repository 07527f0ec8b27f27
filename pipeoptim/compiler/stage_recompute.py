"""Planned recomputation in a generated stage: the stage's whole graph runs as one recomputed
region, so autograd keeps only the stage's inputs per micro-batch in flight and the backward
runs the stage's forward again first (Chen et al., "Training Deep Nets with Sublinear Memory
Cost", arXiv:1604.06174).

It reuses the machinery that keeps a user's own checkpointing
(:mod:`pipeoptim.compiler.recompute`): every ``get_attr`` of a parameter stays outside the
region and is one of its inputs, so the weights pass through the runtime's saved-tensor hooks
and the recomputation uses the weights the method gives the backward (the stashed version
under ``pipedream`` and ``2bw``, so training is the same with or without recomputation; the
current weights under ``pipeoptim``, see that module's docstring). Values the stage only
passes on go straight from its inputs to its outputs and are not kept.
"""

from __future__ import annotations

import torch.fx as fx

from pipeoptim.compiler.recompute import _fold, _Region

#: Name of the region's submodule in a recomputing stage.
REGION = "recomputed_stage"


def recompute_stage(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every operation of the stage graph ``gm`` into one recomputed region, in place
    (a stage without operations, only passing values on, is left as it is); returns ``gm``."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    if nodes:
        _fold(gm, _Region(nodes, preserve_rng_state=True), REGION)
        gm.graph.lint()
        gm.recompile()
    return gm
