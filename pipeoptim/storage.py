"""Where a tensor's memory lies: the address of its storage, to tell which tensors share it.

A tensor of a sparse layout (COO, CSR, ...) has no storage of its own (``untyped_storage()``
raises ``NotImplementedError``): a graph model's sparse adjacency matrix, held as a buffer or
a constant, made profiling fail with "Cannot access storage of SparseTensorImpl" when autograd
saved it for the backward (helper-89). Such a tensor gets address 0: it shares memory with
no other and no byte count includes it (a saved sparse operand is a weight or a constant the
stage holds anyway, not an activation).
"""

from __future__ import annotations

import torch


def storage_address(t: torch.Tensor) -> int:
    """Address of ``t``'s storage; 0 where it has none (a sparse layout) or no data yet
    (an empty or meta tensor)."""
    if t.layout != torch.strided or t.device.type == "meta":
        return 0
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # subclasses without a storage
        return 0


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s whole storage (views of one storage share them); 0 where
    :func:`storage_address` is 0."""
    return t.untyped_storage().nbytes() if storage_address(t) else 0
