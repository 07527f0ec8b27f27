"""``torch.optim.SGD``'s step, one parameter at a time, with a callback after each.

PipeOptim and SpecTrain predict a stage's next forward weights right after its optimizer
step (``Ŵ = W − c · D``, :mod:`pipeoptim.runtime.extrapolation`), from the weights, momentum
buffers and gradients the step has just read and written. Run as two passes over the stage
(torch's step, then the prediction) every tensor is read again from memory; run parameter by
parameter, the prediction finds them in cache. On the throughput benchmark's stage (8 Linear
layers of 512 x 512, 8 MiB, one thread) step + prediction took 2.46 ms this way against
2.90 ms as two passes (torch's step alone: 1.46 ms; step + weight stashing's copy: 2.05 ms).

:func:`sgd_step_each` is torch's for-loop SGD (``torch/optim/sgd.py``, ``_single_tensor_sgd``:
the kernel ``SGD.step()`` runs on the CPU unless ``foreach`` or ``fused`` is set) op for op,
so its results are bit-identical to ``optimizer.step()``; :func:`steps_each` says where it
applies (anything else steps with ``optimizer.step()`` and predicts afterwards).

A parameter larger than :data:`CHUNK_BYTES` is stepped and predicted in flat pieces of that
size, each piece's step and prediction before the next one's, so that the piece's weights,
momentum buffer, gradient and Ŵ are still in the core's L2 cache when the prediction reads
them (element-wise kernels on the same elements: the same results bit for bit). The pieces of
weights, momentum buffers and Ŵ buffers are cut once and kept (:mod:`pipeoptim.runtime.pieces`).
On the throughput benchmark's MLP stage (8 Linear layers of 512 x 512 and their biases, 8 MiB,
one thread; medians, the two versions side by side on 2026-12-04) step + prediction took
2.31 ms in pieces of 256 KiB cut once, against 2.55-2.60 ms in pieces of 512 KiB cut at every
step (torch's step alone: 1.27-1.30 ms; step + weight stashing's copy: 1.97 ms); on the LM
benchmark's first stage (12.3 MiB in 50 tensors) 3.97-4.03 ms against 4.29-4.32 (step 2.0 ms,
step + copy 3.09 ms). A piece's five kernel calls cost about 7 us from Python, so smaller
pieces cost more than the cache saves (64 KiB: 3.1 ms on the MLP stage). The prediction's
terms and pieces are found once per parameter and step (:class:`pipeoptim.runtime.pieces.PiecePlan`)
and the loop over the pieces runs the kernels itself, the gradient cut without view tracking
(its pieces are only read): 2.12 ms on the MLP stage and 3.64 ms on the LM's against 2.29 and
3.85 with a callback and a piece object per piece (2026-12-04). Where the caches hold the
whole stage, pieces only add calls: on an AMD EPYC (1 MiB L2 per core, 32 MiB L3) the MLP's
4-stage stage (4 MiB) took 0.97-1.10 ms in pieces of 128 KiB against 0.61-0.70 ms parameter
by parameter (torch's step alone 0.38-0.47 ms, step + copy 0.55-0.61 ms; 2026-12-04). So
:func:`step_predicting` times both ways over a stage's first steps and keeps the faster
(:class:`pipeoptim.runtime.timed_choice.TimedChoice`; the same bits either way).

torch's fused SGD kernel (``SGD(fused=True)``, one pass over weights, buffer and gradient)
would be faster still, but its momentum buffers differ from the for-loop's in the last bit
(torch 2.13, CPU), so it is not used for a step that must equal ``SGD.step()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.optim import SGD, Optimizer
from torch.optim import optimizer as torch_optimizer

from pipeoptim.runtime.extrapolation import Extrapolator
from pipeoptim.runtime.pieces import Cut, FlatPieces, PiecePlan


def _l2_cache_bytes(cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of CPU 0's level-2 cache in bytes, from Linux's sysfs (``None`` elsewhere)."""
    for index in sorted(cpu.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * 1024 if size.endswith("K") else int(size)
        except (OSError, ValueError):
            return None
    return None


#: bytes of each piece a large parameter is stepped in: an eighth of the L2 cache, room for
#: the piece's weights, momentum buffer, gradient and Ŵ twice over (128 KiB where the size is
#: not known)
CHUNK_BYTES = (_l2_cache_bytes() or 1 << 20) // 8

#: the dtypes stepped in pieces: with two or more threads ATen splits a whole tensor among them
#: at bounds that are not multiples of the vector width, and in bfloat16 and float16 the
#: elements before each bound go through the scalar kernel, which rounds differently from the
#: vector kernel; pieces move those bounds, so in half precision they would not be
#: ``SGD.step()`` bit for bit (float32 and float64 are, at any thread count)
PIECE_DTYPES = frozenset({torch.float32, torch.float64})

#: ``after(param, group)``: called once ``param`` is updated (stepped whole, or in pieces where
#: ``per_piece`` gave no callback)
After = Callable[[torch.Tensor, dict], None]

#: ``per_piece(param, group, cut)``: called before ``param`` is stepped in pieces; returns how
#: to predict each piece of Ŵ as soon as the step has updated it, or ``None``
PerPiece = Callable[[torch.Tensor, dict, Cut], "PiecePlan | None"]

#: a group's hyperparameters as the step reads them: lr, weight decay, momentum, dampening,
#: nesterov, maximize
_Hyper = tuple[float, float, float, float, bool, bool]


def steps_each(optimizer: Optimizer) -> bool:
    """Whether :func:`sgd_step_each` is ``optimizer.step()``: exactly ``torch.optim.SGD`` (not a
    subclass), its for-loop kernel (``foreach`` and ``fused`` unset or false, not
    ``differentiable``), plain float ``lr`` and ``weight_decay``, parameters on the CPU, no
    step hooks (the optimizer's or global) or gradient scaler attached, and no two parameters
    or momentum buffers in one storage (where they overlap, a later parameter's update would
    change an earlier one's Ŵ after it was predicted; views of one flat buffer are refused
    alike)."""
    if type(optimizer) is not SGD:
        return False
    if any(getattr(optimizer, name, None) is not None for name in ("grad_scale", "found_inf")):
        return False
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return False
    if torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks:
        return False
    for group in optimizer.param_groups:
        if group.get("foreach") or group.get("fused") or group.get("differentiable"):
            return False
        if isinstance(group["lr"], torch.Tensor) or isinstance(group["weight_decay"], torch.Tensor):
            return False
        if any(p.device.type != "cpu" or (p.grad is not None and p.grad.is_sparse) for p in group["params"]):
            return False
    return _apart(optimizer)


def _apart(optimizer: SGD) -> bool:
    """No two parameters, and no two momentum buffers, share a storage (empty ones aside)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    buffers = [optimizer.state[p].get("momentum_buffer") for p in params if p in optimizer.state]
    for tensors in (params, buffers):
        places = [t.untyped_storage().data_ptr() for t in tensors if t is not None]
        places = [place for place in places if place]
        if len(set(places)) != len(places):
            return False
    return True


@torch.no_grad()
def sgd_step_each(
    optimizer: SGD,
    after: After,
    per_piece: PerPiece | None = None,
    pieces: FlatPieces | None = None,
    in_pieces: bool = True,
) -> None:
    """``optimizer.step()`` (where :func:`steps_each` holds), calling ``after(param, group)``
    as each parameter with a gradient is updated, before the next one is touched. A parameter
    of more than :data:`CHUNK_BYTES` with a momentum buffer (parameter, gradient and buffer
    contiguous, of a dtype in :data:`PIECE_DTYPES`) is stepped in flat pieces of that size, and
    where ``per_piece(param, group, cut)`` gives a :class:`pipeoptim.runtime.pieces.PiecePlan`,
    each piece of Ŵ is written as soon as the step has updated the piece
    (:func:`pipeoptim.runtime.extrapolation.extrapolate` on the piece); ``after`` is not called
    for it then.

    Args:
        pieces: where the pieces of parameters and momentum buffers are kept from one step
            to the next (``None``: cut at this step only); a step in pieces drops those of
            tensors it did not cut, a whole step leaves them.
        in_pieces: ``False``: every parameter is stepped whole and ``after`` called for it
            (the same bits; which is faster depends on the host's caches,
            :mod:`pipeoptim.runtime.timed_choice`).

    Parameters without a gradient are skipped, as by ``SGD.step()``; momentum buffers are
    created on the first step and kept in ``optimizer.state[param]["momentum_buffer"]``.
    """
    pieces = pieces if pieces is not None else FlatPieces()
    for group in optimizer.param_groups:
        hyper: _Hyper = (
            group["lr"],
            group["weight_decay"],
            group["momentum"],
            group["dampening"],
            group["nesterov"],
            group["maximize"],
        )
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            state = optimizer.state[param] if hyper[2] != 0 else {}
            buf = state.get("momentum_buffer")
            size = max(CHUNK_BYTES // param.element_size(), 1024) // 1024 * 1024
            if (
                not in_pieces
                or buf is None
                or param.numel() <= size
                or param.dtype not in PIECE_DTYPES
                or not _contiguous(param, grad, buf)
            ):
                _sgd_update(hyper, state, param.detach(), grad)
                after(param, group)
                continue
            # the gradient is new at every backward; its pieces are only read
            weights, buffers, grads = (
                pieces.of(param, size),
                pieces.of(buf, size),
                grad.view(-1).unsafe_split(size),
            )
            plan = (
                per_piece(param, group, ((param, weights), (buf, buffers), (grad, grads)))
                if per_piece
                else None
            )
            if plan is None:
                for piece in zip(weights, buffers, grads):
                    _momentum_update(hyper, *piece)
                after(param, group)
                continue
            hats, alpha, first, rest = plan
            for i, (w, b, g) in enumerate(zip(weights, buffers, grads)):
                _momentum_update(hyper, w, b, g)
                hat = hats[i]  # extrapolate() on the piece
                torch.add(w, first[i], alpha=alpha, out=hat)
                for a, terms in rest:
                    hat.add_(terms[i], alpha=a)
    if in_pieces:  # a whole step asks for no pieces: those kept stay for the next step in pieces
        pieces.prune()


def _contiguous(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() and not t.is_sparse for t in tensors)


def _sgd_update(hyper: _Hyper, state: dict, param: torch.Tensor, grad: torch.Tensor) -> None:
    """One parameter's update by torch's ``_single_tensor_sgd``, op for op; ``state`` holds its
    momentum buffer (created here on the first step)."""
    lr, decay, momentum, _, nesterov, maximize = hyper
    buf = state.get("momentum_buffer")
    if momentum != 0 and buf is not None:
        return _momentum_update(hyper, param, buf, grad)
    if maximize:
        grad = -grad
    if decay != 0:
        grad = grad.add(param, alpha=decay)
    if momentum != 0:  # the first step: the buffer is the gradient
        buf = state["momentum_buffer"] = grad.detach().clone()
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    param.add_(grad, alpha=-lr)


def _momentum_update(hyper: _Hyper, param: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor) -> None:
    """``_single_tensor_sgd``'s update of a parameter (or piece) with a momentum buffer."""
    lr, decay, momentum, dampening, nesterov, maximize = hyper
    if maximize:
        grad = -grad
    if decay != 0:
        grad = grad.add(param, alpha=decay)
    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
    param.add_(grad.add(buf, alpha=momentum) if nesterov else buf, alpha=-lr)


def step_predicting(
    optimizer: Optimizer,
    extrapolator: Extrapolator,
    coefficients: Sequence[float],
    into: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """:func:`sgd_step_each` (``optimizer`` must pass :func:`steps_each`) predicting each
    parameter's ``Ŵ = W − c_g · D`` (c per optimizer group) as soon as it is updated, or each
    piece of it (:meth:`Extrapolator.predict_one`, :meth:`Extrapolator.piece_plan`), and
    those without a gradient after the step. Large parameters are stepped in pieces or whole,
    whichever ``extrapolator.piecewise`` (:class:`pipeoptim.runtime.timed_choice.TimedChoice`)
    found faster on this host over the first steps (the first step, which creates the momentum
    buffers and Ŵ, untimed; the pieces kept through the trials, so that a trial in pieces
    costs what a step in pieces costs once chosen).

    Args:
        into: Ŵ buffers from earlier predictions, overwritten (a parameter without one, or
            whose one no longer fits it, gets a new tensor).

    Returns:
        Ŵ by name for the parameters with a direction and ``c ≠ 0``, as
        :meth:`Extrapolator.predict` after ``optimizer.step()`` gives them, bit for bit.
    """
    assert isinstance(optimizer, SGD)
    index = {id(g): i for i, g in enumerate(optimizer.param_groups)}
    hats: dict[str, torch.Tensor] = {}

    def predict(param: torch.Tensor, group: dict) -> None:
        name = extrapolator.name_of.get(id(param))
        if name is not None:
            hat = extrapolator.predict_one(name, group, coefficients[index[id(group)]], into.get(name))
            if hat is not None:
                hats[name] = hat

    def per_piece(param: torch.Tensor, group: dict, cut: Cut) -> PiecePlan | None:
        name = extrapolator.name_of.get(id(param))
        if name is None:
            return None
        c = coefficients[index[id(group)]]
        prepared = extrapolator.piece_plan(name, group, c, into.get(name), cut)
        if prepared is None:
            return None
        hats[name], plan = prepared
        return plan

    extrapolator.piecewise.run(
        lambda in_pieces: sgd_step_each(
            optimizer, predict, per_piece, extrapolator.pieces, in_pieces=in_pieces
        )
    )
    if extrapolator.piecewise.chosen is False:
        extrapolator.pieces.clear()  # whole from now on: keep no views of replaced tensors
    with torch.no_grad():
        for group in optimizer.param_groups:  # parameters without a gradient: not stepped
            for p in group["params"]:
                if p.grad is None:
                    predict(p, group)
    return hats
