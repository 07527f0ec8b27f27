"""The optimizer's update cost per parameter byte, for the plan's cost model.

A neutral layer between compiler and runtime: timing a step and a weight prediction needs the
runtime's predictors (:mod:`pipeoptim.runtime.predictors`), and the figures feed the compiler's
:class:`pipeoptim.compiler.costmodel.CostConfig`; the compiler itself imports nothing from the
runtime.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch.optim import SGD, Optimizer

from pipeoptim.compiler.optimizer_state import builtin_base
from pipeoptim.errors import PredictorError
from pipeoptim.runtime.affinity import unbind_thread
from pipeoptim.runtime.clipping import clip_coefficient, scale_grads_, squared_grad_norm
from pipeoptim.runtime.extrapolation import Extrapolator, per_unit_rate
from pipeoptim.runtime.fused_step import sgd_step_each, steps_each
from pipeoptim.runtime.optim import stage_keywords
from pipeoptim.runtime.pieces import Cut, PiecePlan
from pipeoptim.runtime.predictors import get_predictor


class UpdateCostError(RuntimeError):
    """The optimizer could not be timed on a test parameter."""


class UpdateCosts(NamedTuple):
    """Seconds per parameter byte of a stage's weight work (:func:`measure_update_cost`)."""

    step: float  # one optimizer step
    predict: float  # one weight prediction (ΔW, then Ŵ into a buffer); 0 without a predictor
    copy: float  # one copy of the weights (weight stashing, PipeDream-2BW's shadow)
    clip: float  # one pass over the gradients as clipping makes it: their norm, then their scaling


def measure_update_cost(
    optimizer_class: type[Optimizer],
    defaults: Mapping[str, Any],
    device: torch.device | str = "cpu",
    numel: int = 1 << 20,
    repeats: int = 9,
    tensors: int = 1,
    beside: int = 0,
) -> UpdateCosts:
    """Seconds per parameter byte of one optimizer step, of one weight prediction, of one
    weight copy and of one gradient clipping, on the CPU while ``beside`` other ranks step
    beside this one.

    Times the ``torch.optim`` class ``optimizer_class`` is or derives from
    (:func:`pipeoptim.compiler.optimizer_state.builtin_base`, with the user's defaults)
    stepping ``numel`` float32 elements in
    ``tensors`` parameters (the model's, :func:`working_set`: the per-byte cost grows once the
    weights, gradients and optimizer state leave the caches, and each tensor adds a fixed
    cost) with a gradient (median of ``repeats`` after two warm-up steps), and its predictor
    (:mod:`pipeoptim.runtime.predictors`) computing ΔW and ``Ŵ = W - 2·lr·ΔW`` into a reused
    buffer as the runtime does (:class:`pipeoptim.runtime.extrapolation.Extrapolator`; 0
    without a predictor; for ``torch.optim.SGD`` itself on the CPU, where PipeOptim predicts
    each parameter's Ŵ inside the step, :mod:`pipeoptim.runtime.fused_step`, the time the
    prediction adds to that step's loop, in pieces or whole, whichever is faster, as the
    runtime chooses), and a
    copy of the parameter into a buffer (what weight stashing and 2BW's shadow do per step,
    :mod:`pipeoptim.runtime.stashing`), and the clipping a stage runs before its step under
    ``max_grad_norm`` (:mod:`pipeoptim.runtime.clipping`: the gradients' squared norm in
    float64, then their scaling in place). On the CPU the time is the process's CPU time
    (``time.process_time``), which other processes' load does not inflate (wall time under
    load varied 23× between two measurements seconds apart); on an accelerator, wall time
    between synchronisations.

    A pipeline's ranks on one CPU share its memory bandwidth and last-level cache, and the
    weight work streams weights, gradients and optimizer state through them: SGD with momentum
    on the benchmark MLP's working set took 1.29x its time alone with a second core stepping the
    same (``benchmarks/results/memory_sharing.md``), and the stage workers' weights and steps took
    1.17-1.58x the figure timed alone (``breakdown.md``, run 2026-12-04). With ``beside`` > 0 (on the CPU, one
    torch thread: as a stage worker runs), ``beside`` threads of this process each step their
    own copy of the working set throughout (:func:`stepping_beside`), and the time is this
    thread's CPU time (``time.thread_time``).
    A subclass's own ``__init__`` and ``step()`` are user code and are not run
    (their extra cost, if any, is not in the figure). Feeds
    :class:`pipeoptim.compiler.costmodel.CostConfig`.

    Raises:
        UpdateCostError: ``optimizer_class`` derives from no ``torch.optim`` optimizer (it is
            not timed: that would run its ``step()`` at compile time), or the base class
            cannot step a test parameter.
        ValueError: ``tensors`` not in 1..``numel``; ``beside`` > 0 on an accelerator or with
            more than one torch thread (their threads would share the measuring thread's pool).
    """
    device = torch.device(device)
    if beside and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError(
            f"beside={beside} times the step beside other ranks on the CPU with one torch thread, "
            f"not on {device} with {torch.get_num_threads()} threads: pass beside=0"
        )
    base = builtin_base(optimizer_class)
    if base is None:
        raise UpdateCostError(
            f"{optimizer_class.__name__} derives from no torch.optim optimizer, and timing it would run "
            "its step() at compile time"
        )
    fused_in_step = optimizer_class is SGD  # PipeOptim predicts inside torch's own SGD only
    optimizer_class = base
    if not 1 <= tensors <= numel:
        raise ValueError(f"tensors must be between 1 and numel ({numel}), not {tensors}")
    params = random_parameters(numel, tensors, device)
    keywords = stage_keywords(optimizer_class, defaults)  # as a stage's
    optimizer = optimizer_class(params, **keywords)
    with stepping_beside(
        beside, lambda: optimizer_class(random_parameters(numel, tensors, device), **keywords)
    ):
        return _measure(optimizer, params, fused_in_step, repeats, time.thread_time if beside else None)


def random_parameters(numel: int, tensors: int, device: torch.device) -> list[torch.nn.Parameter]:
    """``numel`` random elements in ``tensors`` parameters of about equal size."""
    return [
        torch.nn.Parameter(torch.randn(numel // tensors + (i < numel % tensors), device=device))
        for i in range(tensors)
    ]


@contextlib.contextmanager
def stepping_beside(count: int, make: Callable[[], Optimizer]) -> Iterator[None]:
    """Within: ``count`` threads each step an optimizer of ``make()`` (over its own
    parameters, each with a fixed gradient) again and again, as the other ranks of a pipeline
    on this CPU step theirs; torch's ops release the GIL, so they run on other cores.

    Raises:
        UpdateCostError: an optimizer beside failed to step (with its error).
    """
    if count == 0:
        yield
        return
    stop, failures = threading.Event(), []
    work = []
    for _ in range(count):  # drawn here: the caller's generator is used from this thread only
        optimizer = make()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        work.append((optimizer, params, [torch.randn_like(p) for p in params]))

    def step(optimizer: Optimizer, params: list[torch.Tensor], gradients: list[torch.Tensor]) -> None:
        unbind_thread()  # a torchrun rank is bound to one core: step beside it, on another
        try:
            while not stop.is_set():
                for param, grad in zip(params, gradients):
                    param.grad = grad
                optimizer.step()
        except Exception as exc:  # raised after the timing, in the measuring thread
            failures.append(exc)

    threads = [threading.Thread(target=step, args=w, name="pipeoptim-step-beside", daemon=True) for w in work]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if failures:
        raise UpdateCostError(
            f"an optimizer stepping beside the timed one failed: {failures[0]}"
        ) from failures[0]


def _measure(
    optimizer: Optimizer,
    params: list[torch.nn.Parameter],
    fused_in_step: bool,
    repeats: int,
    clock: Callable[[], float] | None,
) -> UpdateCosts:
    """:func:`measure_update_cost`'s timings of ``optimizer`` over ``params`` (``clock``
    None: the process's CPU time on the CPU, wall time on an accelerator)."""
    optimizer_class = type(optimizer)
    device = params[0].device
    numel = sum(p.numel() for p in params)
    clock = clock or (time.process_time if device.type == "cpu" else time.perf_counter)

    def timed(fn: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start

    steps = []
    gradients = [torch.randn_like(param) for param in params]
    for _ in range(2 + repeats):
        for param, grad in zip(params, gradients):
            param.grad = grad  # the same values each time: a fresh draw costs more than the step
        try:
            steps.append(timed(optimizer.step))
        except Exception as exc:  # a custom optimizer may not step on a lone parameter
            raise UpdateCostError(
                f"{optimizer_class.__name__}.step() failed on a test parameter: {exc}"
            ) from exc
    nbytes = numel * params[0].element_size()
    copies_of = [torch.empty_like(param) for param in params]

    def copy() -> None:  # as weight stashing copies a stage's weights, tensor by tensor
        for param, into in zip(params, copies_of):
            into.copy_(param.detach())

    copies = [timed(copy) for _ in range(2 + repeats)]

    def clip() -> None:  # as a stage clips before its step (pipeoptim.runtime.clipping)
        scale_grads_(params, clip_coefficient(squared_grad_norm(params), 1.0))  # by about 1e-3

    clips = []
    for _ in range(2 + repeats):
        for param, grad in zip(params, gradients):
            param.grad = grad.clone()  # each clip scales a fresh copy (not timed)
        clips.append(timed(clip))
    step_s, copy_s = statistics.median(steps[2:]) / nbytes, statistics.median(copies[2:]) / nbytes
    clip_s = statistics.median(clips[2:]) / nbytes
    try:
        predictor = get_predictor(optimizer)
    except PredictorError:
        return UpdateCosts(step_s, 0.0, copy_s, clip_s)
    extrapolator = Extrapolator(
        {f"w{i}": param for i, param in enumerate(params)}, optimizer, per_unit_rate(predictor)
    )
    buffers: dict[str, torch.Tensor] = {}

    def prediction() -> None:  # as the runtime predicts after each step: ΔW, then Ŵ into a buffer
        extrapolator.invalidate()
        buffers.update(extrapolator.predict([2 * float(optimizer.param_groups[0]["lr"])], buffers))

    if fused_in_step and steps_each(optimizer):  # on the CPU: PipeOptim predicts inside SGD's step
        c = 2 * float(optimizer.param_groups[0]["lr"])

        def predict(param: torch.Tensor, group: dict) -> None:  # a whole parameter's Ŵ
            name = extrapolator.name_of[id(param)]
            hat = extrapolator.predict_one(name, group, c, buffers.get(name))
            if hat is not None:
                buffers[name] = hat

        def per_piece(param: torch.Tensor, group: dict, cut: Cut) -> PiecePlan | None:
            name = extrapolator.name_of[id(param)]
            prepared = extrapolator.piece_plan(name, group, c, buffers.get(name), cut)
            if prepared is None:
                return None
            buffers[name], plan = prepared
            return plan

        # as the runtime steps (pipeoptim.runtime.fused_step): in pieces or parameter by
        # parameter, whichever takes less (it times both, TimedChoice); the figure is what the
        # prediction adds to that loop, each round timing it with and without the prediction
        # (paired: the host's drift between rounds cancels)
        totals: dict[bool, list[float]] = {True: [], False: []}
        added: dict[bool, list[float]] = {True: [], False: []}

        def stepping(in_pieces: bool, predicting: bool) -> Any:
            after, plan = (predict, per_piece) if predicting else ((lambda p, g: None), None)
            return lambda: sgd_step_each(optimizer, after, plan, extrapolator.pieces, in_pieces=in_pieces)

        for _ in range(2 + repeats):
            for in_pieces in (True, False):
                total = timed(stepping(in_pieces, predicting=True))
                totals[in_pieces].append(total)
                added[in_pieces].append(total - timed(stepping(in_pieces, predicting=False)))
        way = min(totals, key=lambda w: statistics.median(totals[w][2:]))
        return UpdateCosts(step_s, max(statistics.median(added[way][2:]), 0.0) / nbytes, copy_s, clip_s)
    predicts = [timed(prediction) for _ in range(2 + repeats)]
    return UpdateCosts(step_s, statistics.median(predicts[2:]) / nbytes, copy_s, clip_s)


#: the largest working set timed, in float32 elements: beyond the caches the cost per byte
#: stays flat, so larger models are timed at this size (32 MiB of weights on the CPU, 64 MiB on an
#: accelerator: beyond the 50 MB L2 of an H100)
MAX_TIMED_NUMEL = {"cpu": 1 << 23, "other": 1 << 24}
MIN_TIMED_NUMEL = 1 << 10
#: the most tensors timed (a step over 4096 one-element tensors took 36 ms here)
MAX_TIMED_TENSORS = 1 << 12


def working_set(param_bytes: int, param_tensors: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """``(numel, tensors)`` to time the optimizer on (:func:`measure_update_cost`) for a model
    of ``param_bytes`` bytes of trainable parameters in ``param_tensors`` tensors: its size in
    float32 elements rounded to a power of two (nearby models share one measurement) and
    bounded, 2^10 to 2^23 on the CPU (2^24 elsewhere), in as many tensors as keep the model's
    elements per tensor (at most 2^12 tensors: a model of more, smaller ones is timed on 2^12 of
    that size; 3000 one-element parameters were once priced at 1/150 of their step).

    The whole model, not a stage's share of it, so that every layout of the model (N stages x R
    replicas) is priced with the same figure, as compiling that layout alone prices it. Timed
    here (SGD with momentum, one CPU thread): 0.24 ns per byte on one 4 MiB parameter, 0.36 on
    the 50 tensors (12 MiB) of a stage of the transformer benchmark, 0.39 on 64 MiB; the steps
    in that benchmark's stage workers took 1.3 to 2.0 times the figure of the single 4 MiB
    parameter that every plan used before; against the model-sized one they took 1.02 to 1.72
    times it in runs whose forward took 1.06 to 1.53 times its profile (the host's drift)."""
    kind = "cpu" if torch.device(device).type == "cpu" else "other"
    elements = max(param_bytes // 4, 1)
    numel = min(max(1 << round(math.log2(elements)), MIN_TIMED_NUMEL), MAX_TIMED_NUMEL[kind])
    count = max(param_tensors * numel / elements, 1.0)  # the model's elements per tensor
    tensors = min(1 << round(math.log2(count)), numel)
    if tensors > MAX_TIMED_TENSORS:  # fewer tensors, as many elements each: the same cost per byte
        numel = max(numel * MAX_TIMED_TENSORS // tensors, MAX_TIMED_TENSORS)
        tensors = MAX_TIMED_TENSORS
    return numel, tensors


def working_set_of(params: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> tuple[int, int]:
    """:func:`working_set` of the trainable tensors among ``params``."""
    trained = [p for p in params if p.requires_grad]
    return working_set(sum(p.numel() * p.element_size() for p in trained), len(trained), device)
