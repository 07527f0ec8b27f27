"""Profile: measure every node of a traced model on the device the plan is for.

Per node, on an example micro-batch: median forward seconds and median backward seconds
(each measured, after warm-up runs that are not timed, then scaled to add up to the whole
model's, :mod:`pipeoptim.compiler.calibration`), bytes of each output (what crosses a
stage boundary) and of its gradient, bytes of trainable parameters and of buffers, and the
activation bytes autograd saves for the backward. Optimizer-state bytes are not measured
here: they follow from the optimizer class at planning time (see
:func:`pipeoptim.compiler.partition.optimizer_state_factor`).

Profiles are cached under ``profiles/`` keyed by the graph hash, the input shapes and dtypes,
the device name and the torch version (:func:`pipeoptim.compiler.profile_cache.load_or_profile`).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name
from torch.utils import _pytree as pytree

from pipeoptim.autograd_modes import profiling_modes
from pipeoptim.compiler.batch_axes import check_batch_axes
from pipeoptim.compiler.calibration import calibrate, whole_model_seconds
from pipeoptim.compiler.costgraph import CostGraph, CostNode
from pipeoptim.compiler.profile_key import profile_key
from pipeoptim.compiler.recorder import Recorder
from pipeoptim.compiler.saved_bytes import saved_bytes
from pipeoptim.compiler.shapes import length_slopes
from pipeoptim.compiler.trace import TracedModel, node_module
from pipeoptim.errors import ProfileError, first_line


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _value_meta(v: Any) -> dict[str, Any]:
    if isinstance(v, torch.Tensor):
        return {
            "kind": "tensor",
            "shape": list(v.shape),
            "dtype": str(v.dtype).removeprefix("torch."),
            "requires_grad": bool(v.requires_grad),
            "batch_dim": None,
        }
    if isinstance(v, torch.nn.Module):
        return {"kind": "module"}
    if v is None:
        return {"kind": "none"}
    if isinstance(v, bool):
        return {"kind": "bool"}
    if isinstance(v, int):
        return {"kind": "int"}
    if isinstance(v, float):
        return {"kind": "float"}
    return {"kind": "other", "type": type(v).__name__}


def _container(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        flat = all(not isinstance(v, (tuple, list, dict)) for v in value)
        return ("tuple" if isinstance(value, tuple) else "list") if flat else "nested"
    if isinstance(value, dict):
        return "nested"
    return ""


def _is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return (name.endswith("_") and not name.startswith("_")) or bool(node.kwargs.get("inplace"))


def work_clock() -> Callable[[], float]:
    """The clock to time a stage's own work with: with one torch thread (as CPU stages run)
    this thread's CPU time (``time.thread_time``), which other processes sharing the core do
    not inflate; with more threads, whose work this thread's clock would miss,
    ``time.perf_counter``."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


class Timer:
    """Seconds ``fn`` takes: CUDA events on a GPU; on the CPU with one torch thread (as the
    stages run there) this thread's CPU time (``time.thread_time``), which other processes
    sharing the core do not inflate (on the wall clock, the digits CNN profiled at 3-10x its
    idle times while a test suite ran, and a profile is cached and reused); with more
    threads, whose work this thread's clock would miss, ``perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.clock = work_clock()

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = self.clock()
        fn()
        return self.clock() - begin


def _prepare(value: Any, params: set[int], inplace: bool = False) -> Any:
    """Fresh copies of recorded inputs (parameters are used as they are).

    Inputs that required a gradient become leaves that require one; for an in-place
    operation they are non-leaf copies of such leaves, since autograd forbids in-place
    changes of a leaf.
    """

    def one(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or id(v) in params:
            return v
        c = v.detach().clone()
        if v.requires_grad and c.is_floating_point():
            c.requires_grad_(True)
            if inplace:
                c = c.clone()
        return c

    return pytree.tree_map(one, value)


def _measure_node(
    interp: Recorder,
    node: fx.Node,
    params: set[int],
    timer: Timer,
    warmup: int,
    repeats: int,
) -> tuple[float, float]:
    """Median forward and backward seconds of ``node``."""
    args, kwargs = interp.records[node]
    run = getattr(interp, node.op)
    inplace = node in interp.changed or _is_inplace(interp.module, node)
    fixed = _prepare((args, kwargs), params)

    def inputs() -> tuple[tuple, dict]:
        return _prepare((args, kwargs), params, inplace=True) if inplace else fixed

    fwd, bwd = [], []
    for i in range(warmup + repeats):
        a, k = inputs()
        fwd_t = timer(lambda a=a, k=k: run(node.target, a, k))
        a, k = inputs()
        out = run(node.target, a, k)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        sparse = next((t for t in outs if t.layout != torch.strided), None)
        if sparse is not None:
            raise ProfileError(
                f"node {node.name} ({node.target}) makes a sparse tensor ({sparse.layout}) that needs a "
                "gradient, which this pipeline cannot time, send or hold as an activation: make it "
                "dense before it goes on (.to_dense()), or keep sparse tensors to constants and "
                "buffers (torch.sparse.mm(adjacency, dense_activation))"
            )
        bwd_t = 0.0
        if outs:
            grads = [torch.ones_like(t) for t in outs]
            bwd_t = timer(lambda o=outs, g=grads: _backward(o, g, f"node {node.name} ({node.target})"))
        for t in pytree.tree_leaves((a, k)):
            if isinstance(t, torch.Tensor) and t.is_leaf and t.grad is not None:
                t.grad = None
        if i >= warmup:
            fwd.append(fwd_t)
            bwd.append(bwd_t)
    return statistics.median(fwd), statistics.median(bwd)


def _loss_saved_bytes(output: fx.Node, env: dict[fx.Node, Any]) -> int:
    """Estimate of what the loss keeps for its backward (the loss function is not in the
    graph): one copy of the model's floating outputs that need a gradient, as cross-entropy
    keeps its log-softmax."""
    values = [env[n] for n in output.all_input_nodes]
    return sum(
        _nbytes(t)
        for t in pytree.tree_leaves(values)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    )


def _outputs_at(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[fx.Node, Any]:
    """Every node's output when the graph runs on ``inputs`` (no gradients)."""
    recorder = Recorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.env


def _batch_dims(
    gm: fx.GraphModule, inputs: Sequence[torch.Tensor], records: dict[fx.Node, Any]
) -> dict[str, list[int | None]] | None:
    """Which dimension of each tensor output scales with the batch size (None: none does).

    The graph is run a second time with one more example in the batch; a dimension that
    changes in proportion is the batch dimension. Returns None where the graph cannot run at
    another batch size (its shapes are fixed).
    """
    batch = inputs[0].shape[0]
    bigger = [torch.cat([x, x[:1]]) for x in inputs]
    other = Recorder(gm)
    try:
        with torch.no_grad():
            other.run(*bigger)
    except Exception:
        return None
    result: dict[str, list[int | None]] = {}
    for node, (value, _) in records.items():
        new_value = other.env.get(node)
        dims: list[int | None] = []
        for a, b in zip(pytree.tree_leaves(value), pytree.tree_leaves(new_value)):
            dim = None
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                for d, (sa, sb) in enumerate(zip(a.shape, b.shape)):
                    if sa != sb:
                        if sa * (batch + 1) == sb * batch:
                            dim = d
                        break
            dims.append(dim)
        result[node.name] = dims
    return result


@profiling_modes()  # a caller's no_grad or inference mode timed no backward (bwd 0 s, cached)
def profile_model(
    traced: TracedModel,
    example_inputs: Sequence[torch.Tensor],
    *,
    device: torch.device | str | None = None,
    warmup: int = 2,
    repeats: int = 5,
) -> CostGraph:
    """Measure every node of ``traced`` on ``device`` with ``example_inputs`` (one micro-batch).

    The model is copied first; its parameters and buffers are not changed.

    Args:
        traced: output of :func:`pipeoptim.compiler.trace.trace`.
        example_inputs: positional inputs, dim 0 the micro-batch size.
        device: where to measure (default: where the inputs are).
        warmup: untimed runs per node before timing.
        repeats: timed runs per node; the median is kept.

    Raises:
        ProfileError: the graph fails on the example inputs (wrong shape, dtype or device).
    """
    if repeats < 1 or warmup < 0:
        raise ProfileError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = traced.input_names
    if len(example_inputs) > len(names):  # the graph ignored the others; the warm-up raised a TypeError
        raise ProfileError(
            f"{traced.model_name} takes {len(names)} input(s) ({', '.join(names)}), and "
            f"{len(example_inputs)} example inputs were given: give one per input (--input-shape)"
        )
    device = torch.device(device) if device is not None else example_inputs[0].device
    start = time.perf_counter()
    gm = copy.deepcopy(traced.gm).to(device)
    inputs = [x.to(device).clone() for x in example_inputs]  # own storage, not a view of a batch
    recorder = Recorder(gm)
    try:
        recorder.run(*inputs)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(x.shape)} {x.dtype}" for x in inputs)
        raise ProfileError(
            f"{traced.model_name} fails on the example inputs ({shapes}) on {device}: "
            f"{type(exc).__name__}: {first_line(exc)}. Give example "
            "inputs of the shape, dtype and device the model expects"
        ) from exc
    _warm_up(gm, inputs, warmup)
    mutates = recorder.mutated_roots()
    params = {id(p) for p in gm.parameters()}
    timer = Timer(device)
    outputs = {n: recorder.env[n] for n in gm.graph.nodes if n.op != "output"}
    dims = _batch_dims(gm, inputs, {n: (v, None) for n, v in outputs.items()})
    check_batch_axes(gm, dims or {}, outputs)  # a sequence layer must get whole sequences
    slopes = length_slopes(gm, inputs, outputs, lambda xs: _outputs_at(gm, xs))
    saved = saved_bytes(gm, inputs)
    trainable = dict(gm.named_parameters(remove_duplicate=False))
    nodes: list[CostNode] = []
    for node in gm.graph.nodes:
        value = recorder.env.get(node)
        leaves = pytree.tree_leaves(value) if node.op != "output" else []
        module, module_type = node_module(node)
        cost = CostNode(
            name=node.name,
            op=node.op,
            target=_target_name(node),
            inputs=[n.name for n in node.all_input_nodes],
            module=module,
            module_type=module_type,
            mutates=mutates.get(node, []),
        )
        cost.out_meta = [_value_meta(v) for v in leaves]
        cost.out_container = _container(value) if node.op != "output" else ""
        if dims is not None and node.name in dims:
            for meta, dim in zip(cost.out_meta, dims[node.name]):
                if meta["kind"] == "tensor":
                    meta["batch_dim"] = dim
        if slopes is not None and node.name in slopes:
            length = int(inputs[0].shape[1])
            for meta, steps in zip(cost.out_meta, slopes[node.name]):
                if meta["kind"] == "tensor":
                    meta["length"] = None if steps is None else {"at": length, "slopes": steps}
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        cost.out_bytes = sum(_nbytes(t) for t in tensors)
        cost.grad_bytes = sum(_nbytes(t) for t in tensors if t.requires_grad)
        if node.op == "get_attr":
            _attr_costs(cost, node, value, trainable)
        elif node.op in ("call_module", "call_function", "call_method"):
            cost.fwd_s, cost.bwd_s = _measure_node(recorder, node, params, timer, warmup, repeats)
            cost.saved_bytes = saved.saved.get(node.name, 0)
            cost.saved = saved.storages.get(node.name, {})
            if node.op == "call_module":
                sub = gm.get_submodule(str(node.target))
                cost.buffer_bytes = sum(_nbytes(b) for b in sub.buffers())
                own = [(f"{node.target}.{n}", p) for n, p in sub.named_parameters()]
                cost.params = [n for n, p in own if p.requires_grad]
                cost.param_bytes = sum(_nbytes(p) for _, p in own if p.requires_grad)
                cost.buffer_bytes += sum(_nbytes(p) for _, p in own if not p.requires_grad)
        elif node.op == "output":
            cost.saved_bytes = _loss_saved_bytes(node, recorder.env)
            cost.saved = {"loss": cost.saved_bytes} if cost.saved_bytes else {}
        nodes.append(cost)
    calibration = calibrate(nodes, *whole_model_seconds(gm, inputs, timer, max(repeats, 5)))
    return CostGraph(
        model=traced.model_name,
        nodes=nodes,
        batch_size=int(inputs[0].shape[0]),
        key=profile_key(traced, inputs, device),
        source=traced.method,
        tied=traced.tied,
        info={
            "warmup": warmup,
            "repeats": repeats,
            "profile_wall_s": round(time.perf_counter() - start, 3),
            "static_batch": dims is None,
            "dynamic_length": slopes is not None,
            "input_names": traced.input_names,
            "calibration": calibration,
        },
    )


def _warm_up(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], times: int) -> None:
    """Run the whole model forward and backward first, so that no node is timed on the
    process's first use of a kernel (library initialisation, allocator growth)."""
    for _ in range(times):
        out = [t for t in pytree.tree_leaves(gm(*inputs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        if out:
            _backward(out, [torch.ones_like(t) for t in out], "the model")
    gm.zero_grad(set_to_none=True)


def _backward(outs: list[torch.Tensor], grads: list[torch.Tensor], what: str) -> None:
    """``torch.autograd.backward(outs, grads)`` of ``what``; raises ProfileError naming it where
    it fails (under anomaly detection at a NaN: a raw RuntimeError before)."""
    try:
        torch.autograd.backward(outs, grads)
    except RuntimeError as exc:
        fix = (
            "anomaly detection (torch.autograd.set_detect_anomaly) stops at the NaN: give example inputs "
            "on which the model's gradients are finite, or turn it off until compile returns"
            if torch.is_anomaly_enabled() and "nan" in str(exc)
            else "fix the model's code there (torch's message says what failed), or give example "
            "inputs of the shape, dtype and device it expects"
        )
        msg = f"the backward of {what} fails on the example inputs: {first_line(exc).rstrip('.')}; {fix}"
        raise ProfileError(msg) from exc


def _attr_costs(cost: CostNode, node: fx.Node, value: Any, trainable: dict[str, Any]) -> None:
    target = str(node.target)
    if isinstance(value, torch.nn.Module):
        tensors = list(value.buffers()) + [p for p in value.parameters() if not p.requires_grad]
        cost.buffer_bytes = sum(_nbytes(t) for t in tensors)
    elif isinstance(value, torch.Tensor):
        if target in trainable and value.requires_grad:
            cost.param_bytes = _nbytes(value)
            cost.params = [target]
        else:
            cost.buffer_bytes = _nbytes(value)


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    try:
        return _get_qualified_name(node.target)
    except (RuntimeError, AttributeError):
        return str(node.target)
