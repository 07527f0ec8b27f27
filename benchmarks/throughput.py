"""Pipeline throughput on CPU (gloo, one thread per rank), measured side by side in one run.

Two models: a deep MLP (16x512, little compute per stage) and a transformer LM block stack
(d = 256, 8 blocks, sequences of 32 tokens: compute per stage large next to a weight pass).
For 2 and 4 stages: steady-state mini-batches per second of every pipeoptim method, and of
``torch.distributed.pipelining``'s ``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleavedZeroBubble`` and ``ScheduleZBVZeroBubble`` (the last two with two virtual
stages per rank) driving stage modules built from the same kind of plan, with the same
micro-batches; the ratios the issue asks for (PipeOptim, 2BW and SpecTrain to weight stashing,
our flushing schedules to torch's, PipeOptim to zero-bubble); the plan's predicted throughput
against the measured one (the cost model with α and β of gloo and the runtime's CPU time per
action measured first, the cores the ranks share, and the stages priced from a profile taken
just before and right after each run, :func:`priced_now`); the idle share of every run
(``1 − sequential compute / (N · time)``), and the measured peak memory per stage for
PipeOptim against PipeDream's weight stashing (MLP).
Every pipeoptim run is launched as torchrun launches a job (:func:`run_torchrun`: one process
per stage, each reading only its own stage's data, as each rank of torch's schedules does).
On the CPU every rank is bound to cores of its own (:mod:`pipeoptim.runtime.affinity`), torch's
schedules' ranks as well (those of GPipe and 1F1B share pipeoptim's processes; the zero-bubble
ones are bound alike), so that the ratios compare schedules.
PipeOptim runs once more with the processes executor (one script, whose process splits every
mini-batch and feeds the stages: the single-script launch and what it costs).
PipeOptim runs once more (``--quick``: only with ``--compiled``) with every stage compiled by
``torch.compile`` (inductor, ``compile_stages=True``; 2N more warm-up mini-batches, which
include the compilation).
The asynchronous methods (PipeOptim, stashing, 2BW, SpecTrain, none) run in one job, their
timed windows of a few mini-batches taking turns (:func:`_alternate`: a fraction of a second
apart, where this host's speed drifts over seconds); each rate is the median of its windows',
each counted between the last stage's first and last optimizer step of the window. Our GPipe
and 1F1B each run in one job with torch's schedule of that name over the same stages, with the
SGD a user writes (ours step with it too) and with a fused one, their windows taking
turns the same way, a barrier between windows. Every
configuration runs ``--rounds`` times; a ratio is the median over rounds of each round's ratio
(:func:`round_ratios`: the median of the window-by-window ratios for methods of one job, the
ratio of the two runs otherwise), printed with the range of those rounds: a goal inside that
range can tip with one more round.

    python benchmarks/throughput.py [--quick [--compiled]] [--models mlp transformer] [--stages 2 4]
                                    [--methods 2bw ...] [--out DIR]

``--quick`` runs fewer mini-batches and one round, by default at 2 stages on the MLP with three
methods; options given with it still apply. It and runs of some stage counts or methods write
to a new temporary folder unless ``--out`` says otherwise, titled "quick run" or "partial run";
only the full run writes ``benchmarks/results``. Where a stage count does not divide a model's
mini-batch, every run of it uses the largest multiple (:func:`mini_batch_rows`).

Writes ``throughput.md``, ``throughput_timeline.png`` and ``throughput_memory.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from outputs import host, parse_rank_args, positive_int, results_dir, run_kind, stage_count, write_result
from tabulate import tabulate
from torch import nn

import pipeoptim
from pipeoptim.action_overhead import measure_action_overhead
from pipeoptim.compiler import plan_model
from pipeoptim.compiler.codegen import stage_module
from pipeoptim.compiler.costmodel import CostConfig, evaluate
from pipeoptim.compiler.plan import Plan
from pipeoptim.compiler.summary import summarize
from pipeoptim.compiler.trace import trace
from pipeoptim.examples import Block
from pipeoptim.loss_cost import LossPricing
from pipeoptim.machine_costs import load_or_measure_machine_costs
from pipeoptim.runtime.affinity import pin_rank
from pipeoptim.runtime.linkcost import QUICK_SIZES, REPEATS, SIZES, measure_link
from pipeoptim.runtime.spawning import free_port, run_processes
from pipeoptim.update_pricing import UpdatePricing

WIDTH, DEPTH, BATCH, CLASSES = 512, 16, 64, 10
VOCAB, DIM, HEADS, BLOCKS, SEQ, LM_BATCH = 256, 256, 4, 8, 32, 8
#: where the stages run: "cpu" (gloo, one thread per rank) or "cuda" (NCCL, one GPU per rank;
#: ``--device cuda``, from benchmarks/gpu_check.sh on a machine with enough GPUs)
DEVICE = "cpu"


def make_model() -> nn.Module:
    """A deep MLP: every stage boundary carries one [BATCH, WIDTH] activation."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))


def batch(seed: int = 0, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, WIDTH, generator=g), torch.randint(0, CLASSES, (size,), generator=g)


class BlockStack(nn.Module):
    """A transformer language model: token and position embeddings, ``BLOCKS`` pre-norm blocks
    of width ``DIM`` (:class:`pipeoptim.examples.Block`), a final norm and an untied head.
    Input ``[B, SEQ]`` token ids, output ``[B, SEQ, VOCAB]`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(SEQ, DIM)
        self.blocks = nn.Sequential(*(Block(DIM, HEADS) for _ in range(BLOCKS)))
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln_f(self.blocks(self.tok(idx) + self.pos(pos))))


def make_lm() -> nn.Module:
    torch.manual_seed(0)
    return BlockStack()


def lm_batch(seed: int = 0, size: int = LM_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (size, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ``[B, SEQ]`` positions."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


#: name: (model factory, batch factory(seed, rows), loss, rows per mini-batch, description)
MODELS: dict[str, tuple[Any, Any, Any, int, str]] = {
    "mlp": (make_model, batch, F.cross_entropy, BATCH, f"MLP {DEPTH}x{WIDTH}, mini-batch {BATCH}"),
    "transformer": (
        make_lm,
        lm_batch,
        lm_loss,
        LM_BATCH,
        f"transformer LM, {BLOCKS} blocks of d={DIM}, {HEADS} heads, vocabulary {VOCAB}, "
        f"mini-batch {LM_BATCH} x {SEQ} tokens",
    ),
}


# ------------------------------------------------------------------------ pipeoptim


def compile_mlp(
    method: str, stages: int, executor: str, profile_dir: Path, size: int = BATCH, **options: Any
) -> pipeoptim.Pipeline:
    return compile_model("mlp", method, stages, executor, profile_dir, size, **options)


def compile_model(
    model: str,
    method: str,
    stages: int,
    executor: str,
    profile_dir: Path,
    size: int,
    device: str | None = None,
    **options: Any,
) -> pipeoptim.Pipeline:
    make, data, loss, _, _ = MODELS[model]
    net = make()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x, y = data(size=size)
    return pipeoptim.compile(
        net,
        opt,
        stages,
        example_inputs=x.to(device or DEVICE),  # profiled where the stages run
        example_targets=y.to(device or DEVICE),  # the loss priced on the last stage
        loss_fn=loss,
        method=method,
        executor=executor,
        profile_dir=profile_dir,
        **options,
    )


def _compiled(model: str, method: str, stages: int, micro: int, executor: str, run: dict[str, Any]):
    """``method`` compiled for ``model`` at ``stages`` stages with ``executor``, from the shared
    profile in ``run["profile_dir"]`` with the measured ``run["costs"]`` (compile's
    ``bandwidth``, ``latency``, ``action_overhead``)."""
    return compile_model(
        model,
        method,
        stages,
        executor,
        run["profile_dir"],
        mini_batch_rows(model, micro) * _scale(method, micro),
        micro_batches=micro if method in ("gpipe", "1f1b", "2bw") else None,
        device=run["device"],
        compile_stages=run["compile_stages"],
        **run["costs"],
    )


#: one mini-batch of a run, and its flush (both return once this process's part is done)
Stepper = tuple[Callable[[], Any], Callable[[], Any]]


def _alternate(
    steppers: dict[str, Stepper], run: dict[str, Any], sync: Callable[[], Any] | None = None
) -> dict[str, list[tuple[float, float]]]:
    """Each run's ``run["warmup"]`` mini-batches and a flush, then ``run["windows"]`` rounds of
    ``run["steps"] // run["windows"]`` timed mini-batches and a flush of every run in turn, the
    order rotated each round: the runs' windows lie side by side (a fraction of a second
    apart), where this host's speed drifts over seconds. ``sync`` follows every flush (a
    barrier where two frameworks share the process group: no message of one is in flight
    while the other runs). Per run, the start and end of each window (perf_counter seconds)."""
    for step, flush in steppers.values():
        for _ in range(run["warmup"]):
            step()
        flush()
        if sync:
            sync()
    names, per = list(steppers), max(1, run["steps"] // run["windows"])
    spans: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for w in range(run["windows"]):
        for name in names[w % len(names) :] + names[: w % len(names)]:
            step, flush = steppers[name]
            start = time.perf_counter()
            for _ in range(per):
                step()
            flush()
            spans[name].append((start, time.perf_counter()))
            if sync:
                sync()
    return spans


def _scale(method: str, micro: int) -> int:
    """Mini-batches of the other methods per mini-batch of ``method``. PipeDream-2BW steps
    once per M micro-batches of BATCH rows each: its micro-batch is the unit the other
    asynchronous methods run per pass, so it gets mini-batches of M x BATCH rows and its rate
    is counted per BATCH rows, like theirs (same work per pass)."""
    return micro if method == "2bw" else 1


def _data(model: str, method: str, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    return MODELS[model][1](size=mini_batch_rows(model, micro) * _scale(method, micro))


#: per method, every stage's timeline and the spans of its timed windows
Records = dict[str, tuple[list[list[tuple[str, int, float, float]]], list[list[tuple[float, float]]]]]


def as_torchrun_rank(rank: int, world: int, port: int) -> None:
    """Make this process rank ``rank`` of ``world`` as torchrun starts one on one host (its
    environment; one torch thread, as the stages run)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def _torchrun_rank(
    rank: int, world: int, port: int, model: str, methods: list[str], micro: int, run: dict, out: Any
) -> None:
    """One rank of a torchrun job, in the environment torchrun gives it: compiles every method
    with the torchrun executor and runs them by :func:`_alternate`, each step given only the
    data this rank's stage reads (rank 0 the inputs, the last rank the targets), as every rank
    of torch's schedules does; with ``run["partner"]``, that torch.distributed.pipelining
    schedule too, over the first method's stages, on the same process group
    (:func:`torch_schedule`). Puts per run its timeline and windows on ``out`` (the partner's
    timeline: its optimizer steps, ``("S", i, t, t)``)."""
    as_torchrun_rank(rank, world, port)
    with contextlib.ExitStack() as stack:  # the first pipeline owns the process group: closed last
        pipes = {m: stack.enter_context(_compiled(model, m, world, micro, "torchrun", run)) for m in methods}
        steppers: dict[str, Stepper] = {}
        for m in methods:
            x, y = _data(model, m, micro)
            feed = (x if rank == 0 else None, y if rank == world - 1 else None)
            steppers[m] = (partial(pipes[m].step, *feed), pipes[m].flush)
        timelines: dict[str, Any] = {m: pipes[m]._executor.process.timeline for m in methods}
        partner = run.get("partner")
        stamps: dict[str, list[float]] = {}
        for name, fused in zip(partner_runs(partner), (False, True)):
            one_step = torch_schedule(
                model, pipes[methods[0]].plan, partner, micro, rank, world, run["device"], fused
            )
            stamps[name] = []
            steppers[name] = (partial(_stamped, one_step, stamps[name]), lambda: None)
        spans = _alternate(steppers, run, dist.barrier if partner else None)
        for name, times in stamps.items():
            timelines[name] = [("S", i, t, t) for i, t in enumerate(times)]
        out.put((rank, {m: (list(timelines[m]), spans[m]) for m in steppers}))


def _stamped(one_step: Callable[[], None], stamps: list[float]) -> None:
    """``one_step()``, then its end (perf_counter seconds) appended to ``stamps``."""
    one_step()
    stamps.append(time.perf_counter())


def partner_runs(partner: str | None) -> list[str]:
    """The names of the runs of torch.distributed.pipelining's ``partner`` schedule in a job
    (none without one): with the SGD the benchmark gives our stages (as a user writes it; on
    the CPU torch's for-loop step, which our stages keep), and with ``fused=True``, so that the
    table shows what torch's fused step would change."""
    return [f"pipelining {partner}", f"pipelining {partner}, fused SGD"] if partner else []


def run_ranks(target: Any, world: int, args: tuple, what: str, replies: int | None = None) -> dict[int, Any]:
    """``world`` processes started as the runtime starts its workers, each running
    ``target(rank, world, port, *args, out)`` (a free port for the process group); the
    ``(rank, value)`` pairs they put on ``out`` (``replies`` of them; default one per rank).

    Raises:
        RuntimeError: a rank exited with an error (named, with its exit code; the others, which
            would wait on it in gloo, are stopped at once), or no replies after 15 minutes
            (:func:`pipeoptim.runtime.spawning.run_processes`)."""
    port = free_port()
    return run_processes(target, [(r, world, port, *args) for r in range(world)], what, replies, timeout=900)


def run_torchrun(model: str, methods: list[str], stages: int, micro: int, run: dict[str, Any]) -> Records:
    """:func:`_torchrun_rank` in ``stages`` processes, started as torchrun starts them.

    Raises:
        RuntimeError: a rank failed, or the run took over 15 minutes."""
    what = f"{', '.join(methods + partner_runs(run.get('partner')))} on {model}"
    parts = run_ranks(_torchrun_rank, stages, (model, methods, micro, run), what)
    ordered = [parts[k] for k in range(stages)]
    return {m: ([part[m][0] for part in ordered], [part[m][1] for part in ordered]) for m in ordered[0]}


def run_driven(model: str, methods: list[str], stages: int, micro: int, run: dict[str, Any]) -> Records:
    """:func:`_alternate` over the methods compiled with the processes executor: this process
    splits every mini-batch and feeds the stages, on the cores they run on."""
    with contextlib.ExitStack() as stack:
        pipes = {
            m: stack.enter_context(_compiled(model, m, stages, micro, "processes", run)) for m in methods
        }
        steppers = {m: (partial(pipes[m].step, *_data(model, m, micro)), pipes[m].flush) for m in methods}
        spans = _alternate(steppers, run)
        return {m: (pipes[m]._executor.timeline(), [spans[m]] * stages) for m in methods}


def window_measures(
    timeline: list[list[tuple[str, int, float, float]]], spans: list[list[tuple[float, float]]], scale: int
) -> tuple[list[float], float]:
    """Per timed window, the mini-batches per second between the last stage's first and last
    optimizer step in it (``scale`` mini-batches per step; NaN for a window with fewer than
    two), and the idle share of all stages in the steady state of each window: from a stage's
    first optimizer step to the start of its last forward there (the window's fill and drain,
    where stages wait for the pipeline to fill and empty, left out; an action counts from the
    moment its inputs had arrived)."""
    rates, busy, total = [], 0.0, 0.0
    for k, (acts, windows) in enumerate(zip(timeline, spans)):
        for start, end in windows:
            ours = [(op, t0, t1) for op, _, t0, t1 in acts if start <= t0 <= end]
            steps = sorted(t1 for op, _, t1 in ours if op == "S")
            if k == len(timeline) - 1:
                rates.append(
                    (len(steps) - 1) * scale / (steps[-1] - steps[0]) if len(steps) > 1 else math.nan
                )
            forwards = [t0 for op, t0, _ in ours if op == "F"]
            if not steps or not forwards or max(forwards) <= steps[0]:
                continue
            first, last = steps[0], max(forwards)
            busy += sum(t1 - t0 for _, t0, t1 in ours if t0 >= first and t1 <= last)
            total += last - first
    return rates, (1 - busy / total if total else math.nan)


def median_rate(rates: list[float]) -> float:
    """The median of the windows' rates that are numbers (NaN if none is)."""
    return statistics.median([rate for rate in rates if rate == rate] or [math.nan])


#: numbers the jobs of a benchmark run
_JOBS = itertools.count()


def run_pipeoptim(
    model: str,
    methods: list[str],
    stages: int,
    micro: int,
    warmup: int,
    steps: int,
    profile_dir: Path,
    costs: dict[str, float],
    windows: int,
    compile_stages: bool = False,
    launch: str = "torchrun",
    partner: str | None = None,
) -> dict[str, dict[str, Any]]:
    """One run of ``methods``, each on the plan made from the shared profile in
    ``profile_dir`` with the measured ``costs``, their timed windows in turn
    (:func:`_alternate`), launched as a torchrun job (``launch="torchrun"``: one process per
    stage, each reading its own stage's data, like the ranks of torch's schedules) or from this
    process (``"processes"``: the processes executor). Per method: its rate (the median of its
    windows', :func:`window_measures`), each window's rate, and its prediction, the plan
    re-priced (:func:`priced_now`) from a profile taken just before the run and from one taken
    right after it: the geometric mean of the two, as this host's speed drifts. With
    ``partner`` (torchrun launch), that torch.distributed.pipelining schedule runs in the same
    job over the first method's stages, window by window beside them, with the user's SGD and
    with a fused one; their results (rate and window rates) are under :func:`partner_runs`."""
    run = {"profile_dir": profile_dir, "costs": costs, "compile_stages": compile_stages, "device": DEVICE}
    run |= {"warmup": warmup, "steps": steps, "windows": windows, "partner": partner}
    plans = {}
    for m in methods:
        with _compiled(model, m, stages, micro, "local", run) as pipe:
            plans[m] = pipe.plan  # the plan every launch makes from the shared profile
    before = priced_now(model, plans)
    try:
        records = (run_torchrun if launch == "torchrun" else run_driven)(model, methods, stages, micro, run)
    except RuntimeError as exc:  # keep the plans that failed, to run them again by hand
        kept = profile_dir.parent / f"failed-{model}-{stages}-stages-{next(_JOBS)}"
        for m, plan in plans.items():
            plan.save(kept / f"{m}.json")
        raise RuntimeError(f"{exc} (its plans: {kept})") from exc
    afters = priced_now(model, plans)
    job = next(_JOBS)  # the runs of this job pair window by window (round_ratios)
    results = {}
    for m in methods:
        after, scale = afters[m], _scale(m, micro)
        timeline, spans = records[m]
        rates, bubble = window_measures(timeline, spans, scale)
        predicted = [before[m]["throughput_per_s"] * scale, after["throughput_per_s"] * scale]
        results[m] = {
            "rate": median_rate(rates),
            "window_rates": rates,
            "job": job,
            "predicted": math.sqrt(predicted[0] * predicted[1]),
            "predicted_before_after": predicted,
            "cores_bound": after["cores_bound"],
            "bubble": bubble,
            "predicted_bubble": after["bubble_fraction"],
            "timeline": timeline,
            "spans": spans,
            "plan": plans[m],
        }
    for name in partner_runs(partner):
        timeline, spans = records[name]
        rates, _ = window_measures(timeline, spans, 1)
        results[name] = {
            "rate": median_rate(rates),
            "window_rates": rates,
            "job": job,
            "timeline": timeline,
            "spans": spans,
        }
    return results


def priced_now(
    model: str,
    plans: dict[str, Plan],
    profile_dir: Path | None = None,
    pricing: Callable[[CostConfig], CostConfig] | None = None,
) -> dict[str, dict[str, Any]]:
    """The cost model's summary (:func:`pipeoptim.compiler.summary.summarize`) of each plan's
    stages and settings from timings taken now, once for all of them: the model profiled
    again (once per micro-batch size; ``profile_dir`` None: not saved, nor read) and the
    optimizer's step, prediction and copy timed again beside the plan's other ranks on these
    cores, as ``compile`` times them (``pricing`` None:
    :class:`pipeoptim.update_pricing.UpdatePricing`; else each plan's config through it). This
    shared machine's speed drifted up to 2x within a full benchmark run, so the profile the
    plans were made from at its start priced runs half an hour later."""
    make, data, loss, _, _ = MODELS[model]
    net = make()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    pricing = pricing or UpdatePricing.of(optimizer, torch.device(DEVICE), None, print)  # not cached
    graphs: dict[int, Any] = {}
    summaries = {}
    x, y = data()  # one mini-batch: the loss priced on its micro-batches, as compile prices it
    for name, plan in plans.items():
        config = pricing(plan.config)
        if plan.batch_size not in graphs:
            micro = (x[: plan.batch_size],)
            priced = LossPricing(loss, "mean", y, int(x.shape[0]), torch.device(DEVICE), profile_dir, print)
            graphs[plan.batch_size] = plan_model(
                net, micro, config, profile_dir=profile_dir, device=DEVICE, priced=priced
            ).graph
        graph = graphs[plan.batch_size]
        stats = evaluate(graph, [plan.stage_of[node.name] for node in graph.nodes], config, plan.recompute)
        summaries[name] = summarize(graph, stats, config)
    return summaries


# ------------------------------------------------- torch.distributed.pipelining reference


class _TensorStage(nn.Module):
    """One of our stages as torch.distributed.pipelining accepts it: that library sends only
    tensors between stages, so an ``int`` crossing a boundary here (e.g. a sequence length, the
    same for every micro-batch of these fixed shapes) is replaced by a 0-dim placeholder and
    its value is supplied on arrival (torch infers shapes on meta tensors, which hold no
    value to send); its split backward
    (zero-bubble schedules, ``split_backward``) detaches stage outputs in place, which views and
    tensors saved for the backward refuse, so there every output is a fresh copy; every output
    is contiguous (torch sizes the buffers that receive a stage's outputs and their gradients
    like the outputs, and gloo refuses a strided buffer: "input tensor has to be contiguous",
    on the LM), and so is every input's gradient (:class:`_ContiguousGrad`: a plan of the LM
    cut where the gradient of a stage's input came out strided, and the zero-bubble schedules
    failed sending it back); and the last stage returns its one output tensor, as its loss
    expects."""

    def __init__(
        self, module: nn.Module, int_inputs: dict[int, int], last: bool, split_backward: bool
    ) -> None:
        super().__init__()
        self.module, self.int_inputs, self.last = module, int_inputs, last
        self.split_backward = split_backward

    def forward(self, *args: torch.Tensor) -> Any:
        args = tuple(_ContiguousGrad.apply(a) if a.requires_grad else a for a in args)
        values = [self.int_inputs.get(i, a) for i, a in enumerate(args)]
        out = self.module(*values)
        if self.last:
            return out[0]
        return tuple(self._as_tensor(v) for v in out)

    def _as_tensor(self, value: Any) -> torch.Tensor:
        if isinstance(value, int):
            return torch.zeros(())
        if self.split_backward:
            return value.clone(memory_format=torch.contiguous_format)
        return value.contiguous()


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous (one gloo can send)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def int_inputs_of_stages(traced: Any, plan: Plan, micro_batch: torch.Tensor) -> list[dict[int, int]]:
    """Per stage, its inputs that are ``int``: position -> value (one forward of every stage)."""
    found, values = [], (micro_batch,)
    with torch.no_grad():
        for k in range(plan.num_stages):
            found.append({i: v for i, v in enumerate(values) if isinstance(v, int)})
            values = stage_module(traced, plan, k)(*values)
    return found


#: torch.distributed.pipelining schedules: name -> virtual stages per rank
PIPPY = {
    "ScheduleGPipe": 1,
    "Schedule1F1B": 1,
    "ScheduleInterleavedZeroBubble": 2,
    "ScheduleZBVZeroBubble": 2,
}


def stages_of_rank(schedule: str, rank: int, world: int) -> list[int]:
    """Stage indices rank ``rank`` holds: itself; ``rank`` and ``rank + world`` (interleaved,
    looping placement); ``rank`` and ``2·world − 1 − rank`` (ZBV's V-shaped placement)."""
    if PIPPY[schedule] == 1:
        return [rank]
    if schedule == "ScheduleZBVZeroBubble":
        return [rank, 2 * world - 1 - rank]
    return [rank, rank + world]


def torch_schedule(
    model_name: str,
    plan: Plan,
    schedule: str,
    micro: int,
    rank: int,
    world: int,
    device_type: str,
    fused: bool = False,
) -> Callable[[], None]:
    """This rank's part of torch.distributed.pipelining's ``schedule`` over ``plan``'s stages
    (``PIPPY[schedule]`` per rank, :func:`stages_of_rank`), on the process group this process
    has joined, with an SGD optimizer (momentum 0.9) like ours (``fused``: its fused step, else
    torch's default): a call runs one mini-batch of
    ``micro`` micro-batches (rank 0 reads the inputs, the last stage the targets) and the
    optimizer step."""
    import torch.distributed.pipelining as pipelining

    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    make, data, loss, _, _ = MODELS[model_name]
    model = make()
    rows = mini_batch_rows(model_name, micro)
    x, y = data(size=rows)
    traced = trace(model, (x[: rows // micro],))
    int_inputs = int_inputs_of_stages(traced, plan, x[: rows // micro])
    x, y = x.to(device), y.to(device)
    mine = stages_of_rank(schedule, rank, world)
    stages, params = [], []
    for index in mine:
        last = index == plan.num_stages - 1
        split = PIPPY[schedule] > 1  # the zero-bubble schedules
        module = _TensorStage(stage_module(traced, plan, index), int_inputs[index], last, split).to(device)
        params += list(module.parameters())
        stages.append(pipelining.PipelineStage(module, index, plan.num_stages, device))
    cls = getattr(pipelining, schedule)
    sched = cls(stages[0] if len(stages) == 1 else stages, n_microbatches=micro, loss_fn=loss)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=fused or None)
    args = (x,) if 0 in mine else ()
    kwargs = {"target": y, "losses": []} if plan.num_stages - 1 in mine else {}

    def one_step() -> None:
        opt.zero_grad()
        sched.step(*args, **kwargs)
        opt.step()

    return one_step


def _pippy_worker(
    rank: int,
    world: int,
    port: int,
    model_name: str,
    plan_dict: dict,
    schedule: str,
    micro: int,
    warmup: int,
    steps: int,
    windows: int,
    device_type: str,
    out: Any,
) -> None:
    torch.set_num_threads(1)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    else:  # bound to cores as pipeoptim binds its ranks: the ratios compare schedules
        pin_rank(rank, world)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    plan = Plan.from_dict(plan_dict)
    one_step = torch_schedule(model_name, plan, schedule, micro, rank, world, device_type)
    stamps: list[float] = []
    run = {"warmup": warmup, "steps": steps, "windows": windows}
    spans = _alternate({schedule: (partial(_stamped, one_step, stamps), lambda: None)}, run, dist.barrier)
    out.put((rank, ([("S", i, t, t) for i, t in enumerate(stamps)], spans[schedule])))
    dist.destroy_process_group()


def run_pippy(
    model: str, schedule: str, plan: Plan, micro: int, warmup: int, steps: int, windows: int
) -> float:
    """Mini-batches per second of a torch.distributed.pipelining schedule over ``plan``'s
    stages (``plan`` has ``PIPPY[schedule]`` stages per rank), timed as every run of this
    benchmark is (:func:`_alternate`'s windows, :func:`window_measures` over the last rank's
    step stamps); NaN where it fails on this model."""
    world = plan.num_stages // PIPPY[schedule]
    args = (model, plan.to_dict(), schedule, micro, warmup, steps, windows, DEVICE)
    try:
        parts = run_ranks(_pippy_worker, world, args, f"{schedule} on {model}")
    except RuntimeError as exc:  # a schedule that fails on this model is reported as nan
        print(f"    {exc}", file=sys.stderr)
        return float("nan")
    rates, _ = window_measures([parts[k][0] for k in range(world)], [parts[k][1] for k in range(world)], 1)
    return median_rate(rates)


def run_torch_schedule(
    model: str,
    schedule: str,
    n: int,
    micro: int,
    warmup: int,
    steps: int,
    windows: int,
    profile_dir: Path,
    costs: dict[str, float],
) -> dict[str, Any]:
    """torch.distributed.pipelining's ``schedule`` on ``n`` ranks over our plan's stages
    (``PIPPY[schedule]`` per rank; planned for our 1f1b with the same ``costs``: with one stage
    per rank, our 1f1b's stages)."""
    with compile_model(
        model,
        "1f1b",
        n * PIPPY[schedule],
        "local",
        profile_dir,
        mini_batch_rows(model, micro),
        micro_batches=micro,
        **costs,
    ) as pipe:
        plan = pipe.plan
    return {"rate": run_pippy(model, schedule, plan, micro, warmup, steps, windows)}


#: runs whose rates are divided by one another (:func:`ratios`), run next to each other in
#: every round: the stash block has weight stashing beside each method compared with it
PARTNERS = [
    [
        "pipeoptim, compiled stages",
        "pipeoptim, processes executor",
        "pipeoptim",
        "pipedream",
        "spectrain",
        "2bw",
    ],
    ["1f1b", "pipelining Schedule1F1B", "pipelining Schedule1F1B, fused SGD"],
    ["gpipe", "pipelining ScheduleGPipe", "pipelining ScheduleGPipe, fused SGD"],
]


#: the methods that flush every mini-batch (the others run together, :func:`run_pipeoptim`)
FLUSHING = ("gpipe", "1f1b")
#: each flushing method's torch.distributed.pipelining counterpart, run in its job
PARTNER = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}
PARTNER_OF = {schedule: method for method, schedule in PARTNER.items()}


def named(name: str, call: Any) -> dict[str, dict[str, Any]]:
    """``call()``'s result under ``name`` (:func:`measure_rounds`' form)."""
    return {name: call()}


def renamed(name: str, call: Any) -> dict[str, dict[str, Any]]:
    """The one result of ``call()`` (:func:`run_pipeoptim` of one method) under ``name``."""
    (result,) = call().values()
    return {name: result}


def round_order(names: list[str], r: int) -> list[str]:
    """The order of the runs of round ``r`` (0-based): the :data:`PARTNERS` blocks (those of
    ``names``) and every other name alone, the blocks rotated by ``r`` so that none always
    runs first or last, and each block reversed in odd rounds so that neither of two
    partners always runs first."""
    blocks = [[n for n in block if n in names] for block in PARTNERS]
    grouped = {n for block in blocks for n in block}
    blocks = [b for b in blocks if b] + [[n] for n in names if n not in grouped]
    k = r % len(blocks)
    return [n for block in blocks[k:] + blocks[:k] for n in (block[::-1] if r % 2 else block)]


def measure_rounds(runs: dict[str, Any], rounds: int, what: str) -> dict[str, dict[str, Any]]:
    """Every configuration of ``runs`` ``rounds`` times, in the order of :func:`round_order`
    (the two runs of each ratio seconds apart, where the host's speed drifts by up to a third
    over minutes). ``runs`` maps each name to a call that measures it and returns its result
    under its name, and under theirs those of the configurations measured in the same job
    (:func:`run_pipeoptim`), which then do not run again that round. Per configuration the
    run of median rate, with every round's rate, prediction, load and, where windowed, window
    rates."""
    names = list(runs)
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        done: set[str] = set()
        for name in round_order(names, r):
            if name in done:
                continue
            print(f"  {what}, {name} (round {r + 1} of {rounds}) ...", file=sys.stderr)
            load = os.getloadavg()[0]
            try:
                got_results = runs[name]()
            except RuntimeError as exc:  # recorded, and the benchmark goes on
                print(f"    failed: {exc}", file=sys.stderr, flush=True)
                job = [other for other in names if runs[other] is runs[name]]
                got_results = {other: {"rate": math.nan, "error": f"round {r + 1}: {exc}"} for other in job}
            for got, result in got_results.items():
                result["load"] = load
                measured[got].append(result)
                done.add(got)
                extra = f", predicted {result['predicted']:.2f}/s" if "predicted" in result else ""
                print(f"    {got}: {result['rate']:.2f}/s{extra}, load {load:.1f}", file=sys.stderr)
    chosen = {}
    for name, results in measured.items():
        ordered = sorted(results, key=lambda res: res["rate"] if res["rate"] == res["rate"] else -1.0)
        chosen[name] = ordered[(len(ordered) - 1) // 2] | {  # of an even number, the slower middle
            "rates": [res["rate"] for res in results],
            "round_windows": [(res.get("job"), res.get("window_rates")) for res in results],
            "predictions": [res.get("predicted", float("nan")) for res in results],
            "loads": [res["load"] for res in results],
            "errors": [res["error"] for res in results if "error" in res],
        }
    return chosen


def mini_batch_rows(model: str, micro: int) -> int:
    """Rows of ``model``'s mini-batch in a run of ``micro`` micro-batches: its mini-batch rounded
    down to a multiple of ``micro``, for every run of that stage count alike.
    torch.distributed.pipelining sizes its receive buffers from the first micro-batch, so its
    micro-batches must have equal rows (64 rows in 3 micro-batches, 22/21/21, failed there)."""
    rows = MODELS[model][3]
    return rows - rows % micro


def sequential_seconds(model: str, rows: int, repeats: int = 7) -> float:
    """Seconds of one mini-batch of ``rows`` rows' forward, backward and SGD step on one
    thread, no pipeline: the work the stages share. The fastest of ``repeats``: a moment's
    slowdown of the host only lengthens a repeat (a median of 5 under load made the idle share
    of runs measured later negative)."""
    make, data, loss, _, _ = MODELS[model]
    net = make().to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x, y = (t.to(DEVICE) for t in data(size=rows))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


# --------------------------------------------------------------------------- memory


def measure_memory(method: str, stages: int, steps: int, profile_dir: Path) -> list[dict[str, int]]:
    """Per-stage peak weights / optimizer state / activations, with the local executor (same schedule)."""
    with compile_model("mlp", method, stages, "local", profile_dir, BATCH, device="cpu") as pipe:
        for stage in pipe._executor.stages:
            stage.measure_memory = True
        for i in range(steps):
            pipe.step(*batch(i))
        pipe.flush()
        return [stage.memory_report() for stage in pipe._executor.stages]


# --------------------------------------------------------------------------- output


def plot_timeline(result: dict[str, Any], path: Path, title: str) -> None:
    """Every stage's actions in the first timed window of ``result`` (:func:`run_pipeoptim`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline, first = result["timeline"], [windows[0] for windows in result["spans"]]
    start = min(s for s, _ in first)
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(timeline) + 1.5))
    colors = {"F": "tab:blue", "B": "tab:orange", "S": "tab:green"}
    for k, (acts, (begin, end)) in enumerate(zip(timeline, first)):
        for op in "FBS":
            bars = [
                ((t0 - start) * 1e3, (t1 - t0) * 1e3)
                for o, _, t0, t1 in acts
                if o == op and begin <= t0 <= end
            ]
            ax.broken_barh(bars, (k - 0.4, 0.8), color=colors[op], label=op if k == 0 else None)
    ax.set(
        yticks=range(len(timeline)),
        yticklabels=[f"stage {k}" for k in range(len(timeline))],
        xlabel="ms",
        title=title,
    )
    ax.invert_yaxis()
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), labels=["forward", "backward", "optimizer step"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_memory(reports: dict[str, list[dict[str, int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(reports)
    for i, (method, stages) in enumerate(reports.items()):
        xs = [k + i * width for k in range(len(stages))]
        bottom = [0.0] * len(stages)
        for part, hatch in (
            ("weight_bytes", ""),
            ("optimizer_state_bytes", "//"),
            ("activation_bytes", ".."),
        ):
            values = [s[part] / 2**20 for s in stages]
            ax.bar(
                xs,
                values,
                width,
                bottom=bottom,
                hatch=hatch,
                color=f"C{i}",
                edgecolor="black",
                label=f"{method}: {part.replace('_bytes', '').replace('_', ' ')}",
            )
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="stage", ylabel="MiB (measured peak)", title="memory per stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired_ratios(rates_a: list[float], rates_b: list[float]) -> list[float]:
    """``rates_a[r] / rates_b[r]`` of every round where both rates are numbers (runs of the
    same round)."""
    return [a / b for a, b in zip(rates_a, rates_b) if a == a and b == b and b > 0]


def round_ratios(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """Per round, the ratio of configuration ``a``'s rate to ``b``'s (results of
    :func:`measure_rounds`): where both ran in one job, window by window side by side, the
    median over windows of the ratio of their windows of one turn (a fraction of a second
    apart); otherwise the ratio of the two runs' rates. Rounds without two numbers are left
    out."""
    pairs = []
    for (job_a, windows_a), (job_b, windows_b), rate_a, rate_b in zip(
        a["round_windows"], b["round_windows"], a["rates"], b["rates"]
    ):
        if job_a is not None and job_a == job_b and windows_a and len(windows_a) == len(windows_b):
            pairs.append(statistics.median(paired_ratios(windows_a, windows_b)))
        else:
            pairs += paired_ratios([rate_a], [rate_b])
    return pairs


def verdict(pairs: list[float], goal: float | None) -> str:
    """The median of a ratio's rounds, their range, and against ``goal``: ``meets`` (median at
    or above it), ``misses`` (median below it) and, where the goal lies within the range of
    the rounds, ``within the spread of rounds`` -- one more round could tip such a verdict."""
    if not pairs:
        return "nan"
    value, low, high = statistics.median(pairs), min(pairs), max(pairs)
    spread = f"rounds {low:.2f}-{high:.2f}" if len(pairs) > 1 else "1 round"
    if goal is None:
        return f"{value:.3f} ({spread})"
    mark = "meets" if value >= goal else "misses"
    close = ", within the spread of rounds" if low < goal <= high else ""
    return f"{value:.3f} ({spread}; {mark} >= {goal}{close})"


def ratios(model: str, n: int, results: dict[str, dict[str, Any]]) -> str:
    """The issue's ratios for one model and stage count, each against its goal: the median over
    rounds of each round's ratio (:func:`round_ratios`: window by window where the two ran in
    one job; the machine's speed drifted by up to 1.5x over a full benchmark)."""

    def ratio(a: str, b: str, goal: float | None) -> str:
        if a not in results or b not in results:
            return ""
        pairs = round_ratios(results[a], results[b])
        return f"{a} / {b.removeprefix('pipelining ')} {verdict(pairs, goal)}"

    parts = [
        ratio("pipeoptim", "pipedream", 0.95),
        ratio("2bw", "pipedream", 0.95),
        ratio("spectrain", "pipedream", 0.9),
        ratio("1f1b", "pipelining Schedule1F1B", 1.0),
        ratio("gpipe", "pipelining ScheduleGPipe", 1.0),
        ratio("1f1b", "pipelining Schedule1F1B, fused SGD", None),
        ratio("gpipe", "pipelining ScheduleGPipe, fused SGD", None),
        ratio("pipeoptim", "pipelining ScheduleInterleavedZeroBubble", None),
        ratio("pipeoptim", "pipelining ScheduleZBVZeroBubble", None),
        ratio("pipeoptim, compiled stages", "pipeoptim", None),
        ratio("pipeoptim, processes executor", "pipeoptim", None),
    ]
    ours = results["pipeoptim"]
    fit = paired_ratios(ours["rates"], ours["predictions"])
    goal = 0.85 if n <= len(os.sched_getaffinity(0)) else None
    shared = ", cores-bound prediction" if ours.get("cores_bound") else ""
    parts.append(f"pipeoptim measured / predicted {verdict(fit, goal)}{shared}")
    return f"{model}, {n} stages: " + "; ".join(p for p in parts if p)


def summary_line(
    model: str,
    n: int,
    results: dict[str, dict[str, Any]],
    weights: dict[str, int],
    memory_stages: int,
    alpha: float,
    beta: float,
) -> str:
    """The run's one summary line, for ``model`` at ``n`` stages (the last measured): PipeOptim's
    rate, its paired ratios to torch's Schedule1F1B and to weight stashing, and the total weight
    bytes (``weights``, measured on the MLP at ``memory_stages``) of PipeOptim over stashing;
    ``alpha`` (seconds) and ``beta`` (seconds per byte) of the link."""
    ours = results["pipeoptim"]
    ratios_text = "".join(
        f"{statistics.median(round_ratios(ours, results[key]) or [math.nan]):.2f}x {label}, "
        for key, label in (("pipelining Schedule1F1B", "pipelining 1F1B"), ("pipedream", "pipedream"))
        if key in results
    )
    return (
        f"{model}, {n} stages: pipeoptim {ours['rate']:.2f} mini-batches/s = {ratios_text}"
        f"weight memory pipeoptim/pipedream (mlp, {memory_stages} stages) "
        f"{weights['pipeoptim'] / weights['pipedream']:.2f}x; gloo alpha {alpha * 1e6:.0f} us, "
        f"bandwidth {1 / beta / 1e9:.2f} GB/s"
    )


def link_and_overhead(quick: bool) -> tuple[dict[str, float], str]:
    """The link's latency (seconds) and bandwidth (bytes/s) and the runtime's CPU seconds per
    action given to every run's ``compile``, and how they were had. The full run measures them
    now: the median of 3 fits of the link, as :mod:`pipeoptim.machine_costs` takes (one fit's
    alpha read 71 and 396 us in two full runs on this host, and every prediction moved with
    it). ``quick`` on the CPU takes the figures ``compile`` uses
    (:func:`~pipeoptim.machine_costs.load_or_measure_machine_costs`, cached): one quick fit
    failed three times on a busy machine ("send times do not grow with the message sizes")."""
    if quick and DEVICE == "cpu":
        figures = load_or_measure_machine_costs(log=lambda message: print(message, file=sys.stderr))
        return figures._asdict(), "this machine's figures, as `compile` takes them"
    print("measuring the link's latency and bandwidth ...", file=sys.stderr)
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    fits = [
        measure_link(backend, sizes=QUICK_SIZES if quick else SIZES, repeats=3 if quick else REPEATS)
        for _ in range(1 if quick else 3)
    ]
    alpha, beta = (statistics.median(fit[i] for fit in fits) for i in (0, 1))
    # the runtime's CPU time per action beyond compute (the processes executor on the CPU)
    overhead = measure_action_overhead() if DEVICE == "cpu" else 0.0
    source = (
        f"the median of {len(fits)} fit(s) and the overhead measured at the start (pipeoptim.action_overhead)"
    )
    return {"bandwidth": 1 / beta, "latency": alpha, "action_overhead": overhead}, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer steps and rounds; by default 2 stages, the MLP, 3 methods, 2 torch schedules "
        "(under 2 minutes; --stages, --models, --methods, --schedules, --rounds still apply)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write (default: benchmarks/results for the full run, a new temporary "
        "folder for --quick, --stages, --methods, --models or --schedules)",
    )
    parser.add_argument("--stages", type=stage_count, nargs="+", help="stage counts to measure (default 2 4)")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="with --quick: also PipeOptim with compiled stages (inductor; the full run always has it)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(pipeoptim.METHODS),
        help="measure these too (pipeoptim, pipedream and 1f1b always run: the summary compares them)",
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: both")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        help="runs of every configuration, the partners of each ratio side by side, median kept "
        "(default 5; 1 with --quick)",
    )
    parser.add_argument(
        "--schedules",
        nargs="*",
        choices=list(PIPPY),
        help="torch.distributed.pipelining schedules (default: all)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: NCCL, one GPU per rank (needs as many GPUs as stages; benchmarks/gpu_check.sh)",
    )
    args = parse_rank_args(parser)
    global DEVICE
    DEVICE = args.device
    scope = {"stages": [2, 4], "methods": list(pipeoptim.METHODS), "models": list(MODELS)}
    scope |= {"schedules": list(PIPPY), "rounds": 5, "device": "cpu"}  # the full run's values
    stage_counts = args.stages or ([2] if args.quick else [2, 4])
    models = args.models or (["mlp"] if args.quick else list(MODELS))
    if DEVICE == "cuda" and torch.cuda.device_count() < max(stage_counts):
        parser.error(f"--device cuda needs a GPU per stage: {torch.cuda.device_count()} found")
    for model in models:
        if max(stage_counts) > MODELS[model][3]:
            parser.error(
                f"--stages {max(stage_counts)}: {model}'s mini-batch of {MODELS[model][3]} rows "
                "cannot be split into that many micro-batches"
            )
    kind = run_kind(parser, args, scope)
    args.out = results_dir(parser, args, "throughput", scope=scope)
    rounds = args.rounds or (1 if args.quick else 5)
    torch.set_num_threads(1)  # profile as the ranks run: one thread each
    methods = ["pipeoptim", "pipedream", "1f1b"]
    if args.methods:
        methods += [m for m in args.methods if m not in methods]
    elif not args.quick:
        methods = list(pipeoptim.METHODS)
    schedules = ["Schedule1F1B", "ScheduleZBVZeroBubble"] if args.quick else list(PIPPY)
    if args.schedules is not None:
        schedules = args.schedules
    elif "gpipe" in methods and "ScheduleGPipe" not in schedules:
        schedules.append("ScheduleGPipe")  # the partner of our GPipe
    # timed mini-batches: a few seconds per run, so that a slowdown of the shared host for a
    # moment weighs little (the runs' start-up, seconds too, is not timed)
    lengths = {"mlp": (2, 6, 2) if args.quick else (8, 96, 8), "transformer": (4, 40, 4)}
    profile_dir = args.out / ".profiles"
    costs, link_source = link_and_overhead(args.quick)
    alpha, beta = costs["latency"], 1 / costs["bandwidth"]
    rows, ratio_lines, timeline_result, loads = [], [], None, [os.getloadavg()[0]]
    failures: list[str] = []  # runs that failed (their rates are nan)
    for model in models:
        warmup, steps, windows = lengths[model]
        for n in stage_counts:
            micro = n
            sequential = sequential_seconds(model, mini_batch_rows(model, micro))
            # configuration -> a call measuring it (and the others of its job): {name: result}
            runs: dict[str, Any] = {}
            measure = partial(run_pipeoptim, model, stages=n, micro=micro, warmup=warmup, steps=steps)
            measure = partial(measure, profile_dir=profile_dir, costs=costs, windows=windows)
            # the asynchronous methods in one job, window by window side by side
            joint = [m for m in methods if m not in FLUSHING]
            joint_run = partial(measure, joint)  # one call: a failure is every joint method's
            for method in methods:
                runs[method] = joint_run if method in joint else partial(measure, [method])
                if PARTNER.get(method) in schedules:  # torch's schedule in the same job
                    runs[method] = partial(measure, [method], partner=PARTNER[method])
            if args.compiled or not args.quick:
                # compiling happens in the first forwards and backwards of each kind (stage 0's
                # first forward predicts nothing yet): warm up past the pipeline's fill
                compiled = partial(measure, ["pipeoptim"], compile_stages=True, warmup=warmup + 2 * n)
                runs["pipeoptim, compiled stages"] = partial(renamed, "pipeoptim, compiled stages", compiled)
            # the launch of the single-script API: this process feeds the stages
            driven = partial(measure, ["pipeoptim"], launch="processes")
            runs["pipeoptim, processes executor"] = partial(renamed, "pipeoptim, processes executor", driven)
            for schedule in schedules:
                if schedule in PARTNER.values() and PARTNER_OF[schedule] in methods:
                    for name in partner_runs(schedule):  # one job: ours and both of torch's
                        runs[name] = runs[PARTNER_OF[schedule]]
                    continue
                torch_run = partial(
                    run_torch_schedule, model, schedule, n, micro, warmup, steps, windows, profile_dir, costs
                )
                runs[f"pipelining {schedule}"] = partial(named, f"pipelining {schedule}", torch_run)
            results = measure_rounds(runs, rounds, f"{model}, {n} stages")
            loads.append(os.getloadavg()[0])
            best = max((r["rate"] for r in results.values() if r["rate"] == r["rate"]), default=math.nan)
            for name, r in results.items():
                failures += [f"{model}, {n} stages, {name}, {error}" for error in r["errors"]]
                rows.append(
                    [
                        model,
                        n,
                        name,
                        f"{r['rate']:.2f}",
                        f"{r['rate'] / best:.2f}",
                        f"{r['predicted']:.2f}" if "predicted" in r else "-",
                        f"{r['rate'] / r['predicted']:.2f}" if "predicted" in r else "-",
                        f"{r['bubble']:.0%}" if "bubble" in r else "-",
                        f"{r['predicted_bubble']:.0%}" if "predicted_bubble" in r else "-",
                        f"{1 - sequential * r['rate'] / n:.0%}",
                        " ".join(f"{rate:.1f}" for rate in r["rates"]),
                        f"{min(r['loads']):.1f}-{max(r['loads']):.1f}",
                    ]
                )
            ratio_lines.append(ratios(model, n, results))
            # in the log as each configuration ends: a later one that fails keeps these
            print(f"  ratios: {ratio_lines[-1]}", file=sys.stderr, flush=True)
            last = (model, n, results)  # the summary line's: the last measured
            if "timeline" in results["pipeoptim"] and (timeline_result is None or model == "mlp"):
                timeline_result = (model, n, results["pipeoptim"])
    headers = [
        "model",
        "stages",
        "method",
        "mini-batches/s",
        "vs best",
        "predicted /s",
        "measured / predicted",
        "bubble",
        "predicted bubble",
        "idle vs sequential",
        "rounds /s",
        "load",
    ]
    table = tabulate(rows, headers=headers, tablefmt="github")
    print(table)
    print("\n".join(ratio_lines))
    memory_stages = stage_counts[-1] if args.quick else 4
    memory_methods = ["pipeoptim", "pipedream"] + (["2bw"] if "2bw" in methods else [])
    reports = {m: measure_memory(m, memory_stages, 12, profile_dir) for m in memory_methods}
    mem_rows = [
        [
            m,
            k,
            r["weight_versions"],
            f"{r['weight_bytes'] / 2**20:.2f}",
            f"{r['optimizer_state_bytes'] / 2**20:.2f}",
            f"{r['activation_bytes'] / 2**20:.2f}",
            f"{(r['weight_bytes'] + r['optimizer_state_bytes'] + r['activation_bytes']) / 2**20:.2f}",
        ]
        for m, stages in reports.items()
        for k, r in enumerate(stages)
    ]
    mem_table = tabulate(
        mem_rows,
        headers=[
            "method",
            "stage",
            "weight versions",
            "weights MiB",
            "optimizer state MiB",
            "activations MiB",
            "total MiB",
        ],
        tablefmt="github",
    )
    print(mem_table)
    args.out.mkdir(parents=True, exist_ok=True)
    if timeline_result is not None:  # else every pipeoptim run failed
        shown, shown_n, result = timeline_result
        title = f"pipeoptim, {shown}, {shown_n} stages, CPU gloo"
        plot_timeline(result, args.out / "throughput_timeline.png", title)
    plot_memory(reports, args.out / "throughput_memory.png")
    weights = {m: sum(s["weight_bytes"] for s in stages) for m, stages in reports.items()}
    summary = summary_line(*last, weights, memory_stages, alpha, beta)
    described = "\n".join(f"- {name}: {MODELS[name][4]}" for name in models)
    rounded = [(m, n) for m in models for n in stage_counts if mini_batch_rows(m, n) != MODELS[m][3]]
    if rounded:
        described += (
            "\n- "
            + ", ".join(
                f"{m} at {n} stages: mini-batches of {mini_batch_rows(m, n)} rows" for m, n in rounded
            )
            + " (a multiple of the micro-batches, which torch.distributed.pipelining needs equal)"
        )
    text = (
        f"# Throughput ({kind} run, CPU, gloo, 1 thread per rank, "
        f"{host()})\n\nMeasured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC under a load average of {min(loads):.1f} to {max(loads):.1f} (the benchmark's "
        f"own ranks count in it; the `load` column is the range of the 1-minute load when each "
        f"run started).\n\n{described}\n\n"
        f"Every configuration ran {rounds} time(s), the runs of each ratio side by side and the "
        f"order rotated each round; `rounds /s` "
        f"lists each run's rate, and every other column is that of the run of median rate (of "
        f"an even number, the slower middle one). Each ratio below is the median over rounds of "
        f"that round's ratio (the host's speed drifts over the run).\n\n"
        f"The asynchronous methods run in one job per round, their timed windows taking turns "
        f"(a fraction of a second apart); so do our gpipe and 1f1b, each in one job with torch's "
        f"schedule of that name over the same stages, with the SGD a user writes (`pipelining "
        f"...`; on the CPU torch's for-loop step, as our stages do) and with `fused=True` "
        f"(`..., fused SGD`: what torch's fused step changes), a barrier between windows. "
        f"The ratios of runs of one job are, per round, the median of the ratios of their "
        f"windows of one turn. "
        f"Every pipeoptim run is a torchrun job (one process per stage, each reading only its "
        f"stage's data, as every rank of torch.distributed.pipelining's schedules does); "
        f"`pipeoptim, processes executor` is PipeOptim launched from one script, whose process "
        f"splits each mini-batch and feeds the stages on the same cores.\n\n"
        f"Micro-batches = stages for gpipe, 1f1b and torch.distributed.pipelining (zero-bubble "
        f"schedules: 2 virtual stages per rank, the plan made for 2N stages); 2bw runs mini-batches "
        f"of stages x the mini-batch in micro-batches of one mini-batch and its rates count one "
        f"mini-batch per micro-batch; each rate is the median over windows of the timed mini-batches "
        f"(between the last stage's first and last optimizer step of each window; "
        + ", ".join(f"{m}: {w} windows, {n} after {u}" for m, (u, n, w) in lengths.items() if m in models)
        + "). `bubble`: idle share of the stages' time from each one's first optimizer step to "
        "its last forward of each window (fill and drain left out), from the recorded actions, each from "
        "the moment its received inputs had arrived (a wait is idle); `idle vs sequential`: 1 - "
        "(one thread's forward+backward+step time of the whole "
        f"mini-batch) x rate / N, for every run alike. Each prediction is the run's plan priced by "
        f"the cost model from a profile and optimizer timing taken just before the run and from "
        f"one taken right after it (the geometric mean of the two), with the "
        f"gloo alpha {alpha * 1e6:.0f} us and bandwidth {1 / beta / 1e9:.2f} GB/s and the runtime's "
        f"{costs['action_overhead'] * 1e6:.0f} us of CPU per action ({link_source}) and, "
        "where the ranks outnumber the "
        f"{len(os.sched_getaffinity(0))} cores, the cores they share; measured / predicted in the "
        f"ratios is the median over rounds of each run's own ratio.\n\n{table}"
        "\n\n## Ratios (goals of issue 13)\n\n"
        + "\n".join(f"- {line}" for line in ratio_lines)
        + (
            "\n\n## Failed runs (rate nan, left out of the ratios; each rank's error is in the log)\n\n"
            + "\n".join(f"- {line}" for line in failures)
            if failures
            else ""
        )
        + f"\n\n## Peak memory per stage (mlp, {memory_stages} stages, measured)\n\n"
        f"{mem_table}\n\n{summary}\n"
    )
    write_result(args.out / "throughput.md", text)
    print(summary)
    print(f"results in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
