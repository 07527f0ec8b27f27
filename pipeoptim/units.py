"""Parsing and printing of byte sizes, bandwidths and shapes given on the command line."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
#: the largest size or bandwidth taken (1 EB, or 1 EB/s): larger ones overflow as integers or in a plan
MAX_BYTES = 1e18
#: the slowest link taken (bytes/s): below it, a boundary's seconds overflow
MIN_BANDWIDTH = 1.0
#: the largest per-message, per-action or per-byte cost taken (seconds): an hour is a unit
#: mistake, and far larger figures overflow a plan's stage times
MAX_SECONDS = 3600.0
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_seconds(value: object) -> bool:
    """Whether ``value`` is a number of seconds from 0 to :data:`MAX_SECONDS` (NaN is not)."""
    return _is_number(value) and 0 <= value <= MAX_SECONDS


def is_bandwidth(value: object) -> bool:
    """Whether ``value`` is a number of bytes/s from :data:`MIN_BANDWIDTH` to :data:`MAX_BYTES`."""
    return _is_number(value) and MIN_BANDWIDTH <= value <= MAX_BYTES


def parse_bytes(text: str | int | float) -> int:
    """Parse a size such as ``16GiB``, ``16GB``, ``512MiB`` or ``1.5e10`` into bytes.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB)
    powers of 1024; a bare number is bytes.

    Raises:
        ValueError: the text is not a positive size; the message shows accepted forms.
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]*)", text.strip())
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _BYTE_UNITS:
            raise ValueError(
                f"cannot parse size {text!r}: write a number with an optional unit, "
                "e.g. 16GiB, 16GB, 512MiB or 1.5e10 (bytes)"
            )
        value = float(match.group(1)) * _BYTE_UNITS[unit]
    if not 1 <= value <= MAX_BYTES:
        raise ValueError(f"size {text!r} must be from 1 byte to {MAX_BYTES:.0e} bytes (1 EB)")
    return int(value)


def parse_bandwidth(text: str | int | float) -> float:
    """Parse a bandwidth such as ``25GB/s``, ``100Gbit/s``, ``12GiB/s`` or ``1.5e10`` into bytes/s.

    Raises:
        ValueError: the text is not a positive bandwidth; the message shows accepted forms.
    """
    if isinstance(text, bool):  # True was 1 byte/s (helper-144)
        raise ValueError(f"bandwidth {text!r} is no number of bytes per second: give one, e.g. 25GB/s")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        raw = text.strip()
        match = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]*)(?:/s|ps)?", raw)
        unit = match.group(2).lower() if match else None
        bits = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
        if match is None or (unit not in _BYTE_UNITS and unit not in bits):
            raise ValueError(
                f"cannot parse bandwidth {text!r}: write bytes per second with an optional "
                "unit, e.g. 25GB/s, 12GiB/s, 100Gbit/s or 1.5e10"
            )
        scale = _BYTE_UNITS[unit] if unit in _BYTE_UNITS else bits[unit] / 8
        value = float(match.group(1)) * scale
    if not MIN_BANDWIDTH <= value <= MAX_BYTES:
        raise ValueError(
            f"bandwidth {text!r} must be from {MIN_BANDWIDTH:.0f} byte/s to {MAX_BYTES:.0e} bytes/s "
            "(slower links make every time overflow; bytes cost nothing with 'inf' on the command line, "
            "None in Python)"
        )
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``8x3x32x32`` (or ``8,3,32,32``) into a shape tuple.

    Raises:
        ValueError: a dimension is not a positive integer.
    """
    parts = re.split(r"[x,×]", text.strip())
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"cannot parse shape {text!r}: write positive sizes like 8x3x32x32")
    return shape


def parse_dtype(text: str) -> torch.dtype:
    """Parse ``float32``, ``int64``, ``bfloat16``… into a ``torch.dtype``.

    Raises:
        ValueError: no torch dtype has that name.
    """
    dtype = getattr(torch, text.strip(), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {text!r}: use a torch dtype name such as float32 or int64")
    return dtype


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, with an ``s`` (or as ``many``) unless ``count`` is 1 (``1 stage``,
    ``8 replicas``, ``2 micro-batches``)."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def first_few(names: Sequence[str], shown: int = 3, empty: str = "none") -> str:
    """``names`` for a message: the first ``shown``, comma-separated, and how many more
    (``a, b, c and 2 more``; ``empty`` where there are none)."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{', '.join(names[:shown]) or empty}{more}"


_PRINTED_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def byte_unit(n: float) -> str:
    """The binary unit :func:`format_bytes` writes ``n`` bytes in (``"MiB"`` for 1.5 MiB)."""
    for power, unit in enumerate(_PRINTED_UNITS):
        if abs(n) < 1024 ** (power + 1) or unit == "TiB":
            return unit
    raise AssertionError("unreachable")


def format_bytes(n: float, unit: str | None = None) -> str:
    """Format bytes with binary units (``1.5 MiB``), in ``unit`` if given (one of B, KiB,
    MiB, GiB, TiB: a table column's values in the unit of its largest, :func:`byte_unit`, so
    that they compare at a glance).

    Raises:
        ValueError: ``unit`` is none of those.
    """
    unit = byte_unit(n) if unit is None else unit
    if unit not in _PRINTED_UNITS:
        raise ValueError(f"unit must be one of {', '.join(_PRINTED_UNITS)}, got {unit!r}")
    value = n / 1024 ** _PRINTED_UNITS.index(unit)
    return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"


def column_bytes(values: Sequence[float]) -> list[str]:
    """``values`` (bytes) formatted in the unit of the largest (:func:`format_bytes`), so that
    a table column compares at a glance, its decimal points aligned; a value under 1/100 of that
    unit (``0.00`` or ``0.01``, nearly all its digits lost) keeps its own."""
    unit = byte_unit(max(values, key=abs)) if values else "B"
    scale = 1024 ** _PRINTED_UNITS.index(unit)
    return [format_bytes(v, unit if abs(v) >= scale / 100 else None) for v in values]


def format_seconds(s: float) -> str:
    """Format seconds as milliseconds with three significant digits (``1.23 ms``)."""
    return f"{s * 1e3:.3g} ms"
