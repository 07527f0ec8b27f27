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
pieces cost more than the cache saves (64 KiB: 3.1 ms on the MLP stage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.optim import SGD, Optimizer
from torch.optim import optimizer as torch_optimizer

from pipeoptim.runtime.extrapolation import Extrapolator
from pipeoptim.runtime.pieces import FlatPieces, Piece


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

#: ``after(param, group, piece)``: ``piece`` the flat elements just updated, ``None`` for all
After = Callable[[torch.Tensor, dict, "Piece | None"], None]


def steps_each(optimizer: Optimizer) -> bool:
    """Whether :func:`sgd_step_each` is ``optimizer.step()``: exactly ``torch.optim.SGD`` (not a
    subclass), its for-loop kernel (``foreach`` and ``fused`` unset or false, not
    ``differentiable``), plain float ``lr`` and ``weight_decay``, parameters on the CPU, and no
    step hooks (the optimizer's or global) or gradient scaler attached."""
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
    return True


@torch.no_grad()
def sgd_step_each(optimizer: SGD, after: After, pieces: FlatPieces | None = None) -> None:
    """``optimizer.step()`` (where :func:`steps_each` holds), calling ``after(param, group,
    piece)`` once each parameter with a gradient is updated, before the next one is: with
    ``piece=None`` once the whole parameter is, or, for a parameter of more than
    :data:`CHUNK_BYTES` with a momentum buffer (parameter, gradient and buffer contiguous),
    once per flat piece (:class:`pipeoptim.runtime.pieces.Piece`) as soon as that piece is.

    Args:
        pieces: where the pieces of parameters and momentum buffers are kept from one step
            to the next (``None``: cut at this step only).

    Parameters without a gradient are skipped, as by ``SGD.step()``; momentum buffers are
    created on the first step and kept in ``optimizer.state[param]["momentum_buffer"]``.
    """
    pieces = pieces if pieces is not None else FlatPieces()
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            state = optimizer.state[param] if group["momentum"] != 0 else {}
            buf = state.get("momentum_buffer")
            size = max(CHUNK_BYTES // param.element_size(), 1024) // 1024 * 1024
            if buf is None or param.numel() <= size or not _contiguous(param, param.grad, buf):
                _sgd_update(group, state, param.detach(), param.grad)
                after(param, group, None)
                continue
            cut = zip(pieces.of(param, size), pieces.of(buf, size), param.grad.view(-1).split(size))
            addresses = (param.data_ptr(), buf.data_ptr(), param.grad.data_ptr())
            for index, (weights, momentum, grad) in enumerate(cut):
                _sgd_update(group, {"momentum_buffer": momentum}, weights, grad)
                after(param, group, Piece(index, size, (weights, momentum, grad), addresses))
    pieces.prune()


def _contiguous(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() and not t.is_sparse for t in tensors)


def _sgd_update(group: dict, state: dict, param: torch.Tensor, grad: torch.Tensor) -> None:
    """One parameter's (or piece's) update by torch's ``_single_tensor_sgd``, op for op;
    ``state`` holds its momentum buffer (created here on the first step)."""
    lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
    if group["maximize"]:
        grad = -grad
    if decay != 0:
        grad = grad.add(param, alpha=decay)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
    param.add_(grad, alpha=-lr)


def step_predicting(
    optimizer: Optimizer,
    extrapolator: Extrapolator,
    coefficients: Sequence[float],
    into: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """:func:`sgd_step_each` (``optimizer`` must pass :func:`steps_each`) predicting each
    parameter's ``Ŵ = W − c_g · D`` (:meth:`Extrapolator.predict_one`, c per optimizer group)
    as soon as it is updated, and those without a gradient after the step.

    Args:
        into: Ŵ buffers from earlier predictions, overwritten (a parameter without one gets a
            new tensor).

    Returns:
        Ŵ by name for the parameters with a direction and ``c ≠ 0``, as
        :meth:`Extrapolator.predict` after ``optimizer.step()`` gives them, bit for bit.
    """
    assert isinstance(optimizer, SGD)
    index = {id(g): i for i, g in enumerate(optimizer.param_groups)}
    hats: dict[str, torch.Tensor] = {}

    def predict(param: torch.Tensor, group: dict, piece: Piece | None) -> None:
        name = extrapolator.name_of.get(id(param))
        if name is not None:
            c = coefficients[index[id(group)]]
            hat = extrapolator.predict_piece(name, group, c, hats.get(name, into.get(name)), piece)
            if hat is not None:
                hats[name] = hat

    sgd_step_each(optimizer, predict, extrapolator.pieces)
    with torch.no_grad():
        for group in optimizer.param_groups:  # parameters without a gradient: not stepped
            for p in group["params"]:
                if p.grad is None:
                    predict(p, group, None)
    return hats
