"""torch's process-wide numeric settings, carried from the user's process to the stages.

The float32 matmul precision (``torch.set_float32_matmul_precision("medium")``: bfloat16 passes
on a CPU with AMX, TF32 on an Ampere GPU), TF32 and reduced-precision reductions, cuDNN's and
torch's deterministic modes, oneDNN or cuDNN switched off, the default dtype and denormal floats
flushed to zero (``torch.set_flush_denormal``, a setting of the calling thread, which runs the
stages) change what a stage computes, autograd's anomaly detection
(``torch.autograd.set_detect_anomaly``: a NaN gradient raises, naming the forward that made
it) what its backward checks, and each is a setting of the process. A worker process
starts with torch's defaults: the processes executor computed at "highest" where the user had
set "medium" (the local executor, in the user's process, at "medium"), so the two executors
gave other numbers, and the profile, timed at "medium" in the user's process, priced arithmetic
the workers did not run (helper-115, 2026-12-06: a 2.8x faster matmul on that CPU).

:func:`current` reads them, the processes executor hands them to its workers at start and
again before any command after they changed (:func:`apply` sets them there), under torchrun
the ranks compare them at ``compile``, and :func:`changed` (those not at torch's default) is
part of a profile's key (:func:`pipeoptim.compiler.profile_key.profile_key`).

torch 2.9 added per-backend ``fp32_precision`` settings; where they exist they are read and set
instead of ``get_float32_matmul_precision`` and ``allow_tf32``, whose getters raise once the
two kinds of setting were mixed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

#: torch >= 2.9: float32 arithmetic per backend operation ("ieee", "tf32", "bf16"), at its
#: default; "none" at an operation defers to its backend's setting, and that to the global one
PRECISIONS = {
    "cuda.matmul": "ieee",
    "cudnn.conv": "tf32",
    "cudnn.rnn": "tf32",
    "mkldnn.matmul": "ieee",
    "mkldnn.conv": "ieee",
    "mkldnn.rnn": "ieee",
}
#: the settings of torch before 2.9, at their default (read where torch >= 2.9 can still read
#: them, and set first, so that a worker is set as the user's process was: by them alone)
LEGACY = {"float32_matmul_precision": "highest", "cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": True}
#: where torch >= 2.9 keeps those settings, as set ("none" included), from the global one down:
#: a worker gets them as the user set them (resolved, a global "bf16" was set on the cuda
#: backend, which refuses it, and the workers died: helper-117)
RAW_PRECISIONS = (
    "fp32_precision",
    "cuda.matmul.fp32_precision",
    "cudnn.fp32_precision",
    "cudnn.conv.fp32_precision",
    "cudnn.rnn.fp32_precision",
    "mkldnn.fp32_precision",
    "mkldnn.matmul.fp32_precision",
    "mkldnn.conv.fp32_precision",
    "mkldnn.rnn.fp32_precision",
)
#: scaled dot-product attention's kernels (``torch.backends.cuda``, for the CPU too: flash
#: off ran another CPU kernel, 1.5e-8 from the default, helper-117): getter, setter, default
ATTENTION = {
    "sdp.flash": ("flash_sdp_enabled", "enable_flash_sdp", True),
    "sdp.mem_efficient": ("mem_efficient_sdp_enabled", "enable_mem_efficient_sdp", True),
    "sdp.math": ("math_sdp_enabled", "enable_math_sdp", True),
    "sdp.cudnn": ("cudnn_sdp_enabled", "enable_cudnn_sdp", True),
    "sdp.math_reduced_precision": (
        "fp16_bf16_reduction_math_sdp_allowed",
        "allow_fp16_bf16_reduction_math_sdp",
        False,
    ),
}
#: the other flags under ``torch.backends`` that change results, with their defaults
FLAGS = {
    "cuda.matmul.allow_fp16_reduced_precision_reduction": True,
    "cuda.matmul.allow_bf16_reduced_precision_reduction": True,
    "cudnn.enabled": True,
    "cudnn.deterministic": False,
    "cudnn.benchmark": False,
    "mkldnn.enabled": True,
    "opt_einsum.enabled": None,  # on where the opt_einsum package is installed
}


def _backend(path: str) -> tuple[Any, str]:
    """The object under ``torch.backends`` holding the setting ``path`` and its attribute name."""
    owner: Any = torch.backends
    parts = path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


@functools.cache
def _new_api() -> bool:
    owner, name = _backend("mkldnn.matmul.fp32_precision")
    return hasattr(owner, name)


def _precision(operation: str) -> str:
    """The float32 arithmetic ``operation`` (``"mkldnn.matmul"``) runs with, "none" resolved."""
    backend = operation.split(".")[0]
    for path in (operation, backend):
        value = getattr(*_backend(f"{path}.fp32_precision"), "none")  # torch.backends.cuda has none
        if value != "none":
            return str(value)
    value = str(torch.backends.fp32_precision)
    return "ieee" if value == "none" else value


def _legacy() -> dict[str, Any]:
    """The settings of :data:`LEGACY` as torch reads them; none where torch >= 2.9 refuses to
    (its getters raise once the new settings were used)."""
    try:
        return {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    except RuntimeError:
        return {}


def _flush_denormal() -> bool:
    """Whether the calling thread flushes denormal floats to zero (``torch.set_flush_denormal``,
    which has no getter): a float32 denormal, 1e-40, multiplied by 1 comes out 0 (about 4 us)."""
    return float(torch.tensor(1e-40, dtype=torch.float32, device="cpu") * 1.0) == 0.0


def _attention() -> dict[str, tuple[str, str, bool]]:
    """:data:`ATTENTION`'s switches this torch has."""
    return {k: v for k, v in ATTENTION.items() if hasattr(torch.backends.cuda, v[0])}


def current() -> dict[str, Any]:
    """This process's numeric settings as plain, picklable values: ``{name: value}``, names
    being paths under ``torch.backends`` (torch >= 2.9: ``"mkldnn.matmul"``, ... with the
    float32 arithmetic each runs with, and :data:`RAW_PRECISIONS` as set), the :data:`LEGACY`
    ones, the attention kernels (:data:`ATTENTION`), ``default_dtype``,
    ``deterministic_algorithms`` as ``(enabled, warn_only)``, ``flush_denormal`` and
    ``detect_anomaly`` as ``(enabled, check_nan)``."""
    values: dict[str, Any] = {}
    if _new_api():
        values |= {op: _precision(op) for op in PRECISIONS}
        values |= {path: getattr(*_backend(path)) for path in RAW_PRECISIONS if hasattr(*_backend(path))}
    values |= _legacy()
    values |= {name: getattr(*_backend(name)) for name in FLAGS}
    values |= {name: getattr(torch.backends.cuda, get)() for name, (get, _, _) in _attention().items()}
    values["default_dtype"] = torch.get_default_dtype()
    values["deterministic_algorithms"] = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    values["flush_denormal"] = _flush_denormal()
    values["detect_anomaly"] = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
    return values


def compared() -> dict[str, Any]:
    """:func:`current` less what repeats the rest: on torch >= 2.9 the :data:`LEGACY` names,
    which torch refuses to read once its new settings were used (what torchrun ranks
    compare: a rank that had used them showed three "(none)" lines, helper-117)."""
    values = current()
    return {k: v for k, v in values.items() if k not in LEGACY} if _new_api() else values


def changed(device_type: str | None = None) -> dict[str, str]:
    """The settings of :func:`current` that change results (or, anomaly detection, the time of
    a backward) from torch's defaults, as text (for a profile's key: a profile timed with them
    is not reused without them, nor the reverse).
    On torch >= 2.9 the :data:`LEGACY` names and :data:`RAW_PRECISIONS` are left out: the
    arithmetic each operation runs with says the same. With ``device_type``, only those of
    its backends: on the CPU not CUDA's and cuDNN's (TF32 left CPU results as they were, and
    "medium" and oneDNN's bfloat16 matmuls were two keys for one arithmetic), on a GPU not
    oneDNN's nor the CPU's flushing of denormals."""
    defaults = (PRECISIONS if _new_api() else LEGACY) | FLAGS
    defaults |= {"opt_einsum.enabled": torch.backends.opt_einsum.is_available()}
    defaults |= {name: default for name, (_, _, default) in _attention().items()}
    defaults |= {"default_dtype": torch.float32, "deterministic_algorithms": (False, False)}
    defaults |= {"flush_denormal": False, "detect_anomaly": (False, True)}
    other = {"cpu": ("cuda.", "cudnn."), "cuda": ("mkldnn.", "flush_denormal")}.get(device_type or "", ())
    values = [(k, v) for k, v in current().items() if not k.startswith(other)]
    return {name: str(value) for name, value in values if name in defaults and value != defaults[name]}


def apply(settings: dict[str, Any]) -> None:
    """Set this process's numeric settings to ``settings`` (:func:`current` of another
    process): first the :data:`LEGACY` ones, then :data:`RAW_PRECISIONS` still differing,
    from the global one down, then the rest.

    Raises:
        ValueError: ``settings`` were read under another torch (a name this torch lacks), or
            they flush denormals and this CPU cannot (no SSE3 on x86).
    """
    unknown = sorted(set(settings) - set(current()) - set(LEGACY))
    if unknown:
        raise ValueError(f"torch settings {unknown} are unknown to torch {torch.__version__}")
    for name in LEGACY:  # the precision first: it sets allow_tf32 too
        if name in settings and _legacy().get(name) != settings[name]:
            if name == "float32_matmul_precision":
                torch.set_float32_matmul_precision(settings[name])
            else:
                setattr(*_backend(name), settings[name])
    for name in RAW_PRECISIONS:
        if name in settings and getattr(*_backend(name)) != settings[name]:
            setattr(*_backend(name), settings[name])
    attention = _attention()
    for name, value in settings.items():
        if name in LEGACY or name in PRECISIONS or name in RAW_PRECISIONS:
            continue  # (the arithmetic of each operation follows from the raw settings)
        if name in attention:
            get, enable, _ = attention[name]
            if getattr(torch.backends.cuda, get)() != value:
                getattr(torch.backends.cuda, enable)(value)
        elif name == "default_dtype":
            torch.set_default_dtype(value)
        elif name == "deterministic_algorithms":
            torch.use_deterministic_algorithms(value[0], warn_only=value[1])
        elif name == "detect_anomaly":
            torch.autograd.set_detect_anomaly(value[0], check_nan=value[1])
        elif name == "flush_denormal":
            if _flush_denormal() != value and not torch.set_flush_denormal(value):
                raise ValueError(
                    "the user's process flushes denormal floats to zero (torch.set_flush_denormal"
                    "(True)) and this CPU cannot: call torch.set_flush_denormal(False) there"
                )
        elif getattr(*_backend(name)) != value:
            setattr(*_backend(name), value)
