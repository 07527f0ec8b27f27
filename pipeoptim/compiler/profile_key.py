"""What a profile is valid for (:func:`profile_key`): a saved profile is reused only while
every part of its key matches (:mod:`pipeoptim.compiler.profile_cache`)."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeoptim import numerics
from pipeoptim.compiler.trace import TracedModel

#: /proc/cpuinfo's names for the CPU model, most telling first (x86; ARM boards; POWER)
CPU_MODEL_KEYS = ("model name", "Model", "Hardware", "cpu")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model: the first of :data:`CPU_MODEL_KEYS` Linux's ``cpuinfo`` lists (undecodable
    bytes and lines without a value are passed over), else :func:`platform.processor` or
    :func:`platform.machine`."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, colon, value = line.partition(":")
            if colon and value.strip():
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = next((fields[k] for k in CPU_MODEL_KEYS if k in fields), "")
    return model or platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """Human-readable device identity used in profile keys (GPU model or CPU model)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()}"


#: What the profiler measures; profiles of another version are measured again. 2: saved
#: activations per storage and length slopes; 3: times calibrated (compiler/calibration.py);
#: 4: on the CPU with one thread, the thread's CPU time instead of the wall clock; 5: the
#: in-place changes of each node (``CostNode.mutates``: without them a plan could cut between
#: a change and its tensor); 6: also a leaf module's changes of its own buffers.
MEASURES = 6


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def profile_key(traced: TracedModel, inputs: Sequence[torch.Tensor], device: torch.device) -> dict:
    """What a profile is valid for: graph, input shapes/dtypes, device, torch version, what
    the profiler measures (:data:`MEASURES`), on the CPU torch's thread count, the
    ``torch.autocast`` dtype where the profile is made under autocast, and torch's numeric
    settings that are not at their default (:func:`pipeoptim.numerics.changed`:
    ``torch.set_float32_matmul_precision("medium")`` made float32 matmuls 2.8x faster on a CPU
    with AMX)."""
    key = {
        "graph_hash": traced.graph_hash,
        "inputs": [[list(x.shape), _dtype_name(x.dtype)] for x in inputs],
        "device": device_name(device),
        "torch": str(torch.__version__),  # a plain str (torch.__version__ is a TorchVersion)
        "measures": MEASURES,
    }
    if device.type == "cpu":  # a profile timed with other threads than the stages run with misleads
        key["threads"] = torch.get_num_threads()
    if torch.is_autocast_enabled(device.type):
        key["autocast"] = _dtype_name(torch.get_autocast_dtype(device.type))
    settings = numerics.changed(device.type)
    if settings:  # at torch's defaults the key is as before (saved profiles stay valid)
        key["torch settings"] = settings
    return key


def precision_differs(key: dict, inputs: Sequence[torch.Tensor], autocast: torch.dtype | None) -> str | None:
    """How a plan's profile ``key`` (:func:`profile_key`) differs from a run with ``inputs``
    and ``autocast`` in what fixes the dtypes of the values crossing stage boundaries (the
    plan records them, and worker processes receive into buffers of those dtypes): the
    autocast dtype or the inputs' dtypes. ``None`` where they agree."""
    planned, wanted = key.get("autocast"), None if autocast is None else _dtype_name(autocast)
    if planned != wanted:
        made = "without autocast" if planned is None else f"under {planned} autocast"
        runs = "without autocast" if wanted is None else f"under {wanted} autocast"
        return f"the plan was made {made}, this pipeline runs {runs}"
    planned_dtypes = [d for _shape, d in key.get("inputs", [])]
    dtypes = [_dtype_name(x.dtype) for x in inputs]
    if planned_dtypes != dtypes:
        planned_list, list_now = ", ".join(planned_dtypes), ", ".join(dtypes)
        return f"the plan was made for inputs of dtype {planned_list}, these are {list_now}"
    return None
