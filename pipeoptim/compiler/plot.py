"""A picture of a plan: per-stage time and memory, and where the cuts fall in the model.

Three panels (matplotlib, Agg):

1. per stage, forward, backward, optimizer-update (and prediction) and communication
   milliseconds per micro-batch as stacked bars, against the bottleneck and the lower bound
   ``max(total work / N, largest node)`` (:func:`pipeoptim.compiler.summary.summarize`);
2. per stage, the memory it holds (weights, gradients, optimizer state, weight copies,
   buffers, saved activations; GiB, or MiB below 1 GiB) against the per-stage limit;
3. with the cost graph, the model's nodes in graph order (width: their share of the work),
   coloured by stage, each cut labelled with the module the next stage begins in.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeoptim.compiler.costgraph import CostGraph
from pipeoptim.compiler.plan import Plan
from pipeoptim.fileio import atomic_write

_GIB = 2.0**30
_MIB = 2.0**20
_PARTS = (
    ("fwd_s", "forward"),
    ("bwd_s", "backward"),
    ("update_s", "update"),
    ("comm_s", "communication"),
    ("overhead_s", "runtime overhead"),
)


def stage_starts(plan: Plan, graph: CostGraph) -> list[tuple[int, float, str]]:
    """Where each stage begins in the model: ``(stage, share of the model's work before its
    first node that does work, label)``, in stage order. The label is the module path that
    node ran in (its name where it ran in none)."""
    total = graph.total_time_s or 1.0
    done = 0.0
    found: dict[int, tuple[int, float, str]] = {}
    for node in graph.nodes:
        stage = plan.stage_of[node.name]
        if node.time_s > 0 and stage not in found:
            found[stage] = (stage, done / total, node.module or node.name)
        done += node.time_s
    return [found[s.index] for s in plan.stages if s.index in found]


def plot_plan(plan: Plan, path: str | os.PathLike[str], graph: CostGraph | None = None) -> None:
    """Draw ``plan`` as a PNG at ``path`` (written atomically); see the module docstring.

    ``graph`` (the cost graph the plan was made from) adds the model strip with module names;
    without it the stage numbers are labelled with each stage's first node.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = plan.stages
    index = [s.index for s in stages]
    rows = 3 if graph is not None else 2
    fig, axes = plt.subplots(rows, 1, figsize=(max(7.0, 0.55 * len(stages) + 3), 3.2 * rows), squeeze=False)
    ax_time, ax_mem = axes[0][0], axes[1][0]
    bottom = [0.0] * len(stages)
    for attr, label in _PARTS:
        values = [getattr(s, attr) * 1e3 for s in stages]
        if any(values):
            ax_time.bar(index, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
    summary = plan.summary
    ax_time.axhline(summary["bottleneck_s"] * 1e3, color="black", lw=1, label="bottleneck")
    ax_time.axhline(summary["lower_bound_s"] * 1e3, color="grey", lw=1, ls="--", label="lower bound")
    solved = summary.get("status", "")
    ax_time.set(
        ylabel="ms per micro-batch",
        title=f"{plan.model}: {plan.num_stages} stages, method {plan.config.method}, balance "
        f"{summary['balance_ratio']:.2f}\n{summary.get('partitioner', '')}: {solved}",
    )
    ax_time.legend(fontsize="small", ncol=3)
    limit = plan.config.memory_limit
    scale, unit = (
        (_GIB, "GiB") if max([s.memory_bytes for s in stages] + [limit or 0]) >= _GIB else (_MIB, "MiB")
    )
    ax_mem.bar(index, [s.memory_bytes / scale for s in stages], color="tab:purple", label="stage memory")
    if limit is not None:
        ax_mem.axhline(limit / scale, color="red", lw=1, label="limit")
    ax_mem.set(ylabel=unit, xlabel="stage")
    ax_mem.legend(fontsize="small")
    for ax in (ax_time, ax_mem):
        ax.set_xticks(index)
    if graph is None:  # name where each stage begins under the stage numbers
        ax_mem.set_xticks(
            index, [f"{s.index}\n{s.first_node}" for s in stages], fontsize="x-small", rotation=60
        )
    else:
        _model_strip(axes[2][0], plan, graph)
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _model_strip(ax, plan: Plan, graph: CostGraph) -> None:
    """The nodes in graph order, width proportional to their work, coloured by stage."""
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab20")
    total = graph.total_time_s or 1.0
    x = 0.0
    for node in graph.nodes:
        width = node.time_s / total
        if width > 0:
            ax.barh(0, width, left=x, color=colours(plan.stage_of[node.name] % 20), height=0.6)
        x += width
    for stage, start, label in stage_starts(plan, graph):
        if stage > 0:
            ax.axvline(start, color="black", lw=0.8)
            ax.text(start, 0.4, label, rotation=60, fontsize="x-small", ha="left", va="bottom")
    ax.set(xlim=(0, 1), ylim=(-0.5, 2.5), yticks=[], xlabel="share of the model's work, in graph order")
