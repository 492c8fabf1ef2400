"""Parsing of human sizes ("8GB", "512 MiB") and rates ("68 GB/s")."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_FACTORS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_bytes(value: int | float | str) -> int:
    """Parse a size into bytes.

    Args:
        value: a number of bytes, or a string such as "8GB", "512 MiB", "1.5 GB".
            Decimal units (KB, MB, GB) are powers of 1000, binary ones (KiB...) of 1024.

    Returns:
        The size in bytes.

    Raises:
        ValueError: on an unknown unit, a malformed string or a negative number.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '8GB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"expected a size like '8GB' or '512MiB', got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _FACTORS[(unit or "B").upper()])


def parse_rate(value: int | float | str) -> float:
    """Parse a bandwidth such as "68GB/s" into bytes per second."""
    if isinstance(value, str):
        text = value.strip()
        if not text.lower().endswith("/s"):
            raise ValueError(f"expected a rate like '68GB/s', got {value!r}")
        return float(parse_bytes(text[:-2]))
    return float(parse_bytes(value))


def format_bytes(n: float) -> str:
    """Format bytes as a short human string (binary units): 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
