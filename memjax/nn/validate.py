"""Argument checks shared by the block constructors: each error names the block and the argument."""
from __future__ import annotations


def check_positive(block: str, **values) -> None:
    """Every value must be > 0."""
    for name, v in values.items():
        if v is None or v <= 0:
            raise ValueError(f"{block}: {name} must be positive, got {v!r}")


def check_nonnegative(block: str, **values) -> None:
    for name, v in values.items():
        if v is None or v < 0:
            raise ValueError(f"{block}: {name} must be >= 0, got {v!r}")


def check_choice(block: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{block}: {name} must be one of {tuple(allowed)}, got {value!r}")


def check_range(block: str, name: str, value, low, high, *, low_open=False, high_open=False) -> None:
    """``low <= value <= high`` (``<`` on an open side)."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{block}: {name} must be in {lo}{low}, {high}{hi}, got {value!r}")


def check_heads(block: str, d_model: int, num_heads: int, head_dim: int | None) -> tuple[int, int]:
    """``(num_heads, head_dim)`` with ``head_dim`` defaulting to ``d_model // num_heads``."""
    check_positive(block, d_model=d_model, num_heads=num_heads)
    if head_dim:
        check_positive(block, head_dim=head_dim)
        return num_heads, head_dim
    if d_model % num_heads:
        raise ValueError(f"{block}: num_heads ({num_heads}) must divide d_model ({d_model}), or give head_dim")
    return num_heads, d_model // num_heads


def check_no_segments(block: str, segment_ids) -> None:
    """A call with a decoding cache continues one stream per row: packed ``segment_ids`` are refused."""
    if segment_ids is not None:
        raise ValueError(f"{block}: segment_ids are not supported with a decoding cache")
