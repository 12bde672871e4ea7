"""The values registers may hold: msgpack's data model, checked and normalised.

Registers compare values only to break exact timestamp ties, and every replica must break them the
same way, so a value's identity is its canonical msgpack bytes (`value_key`). Tuples are stored as
lists because that is what they decode as; NaN is refused because it is not equal to itself, which
would make "merge is idempotent" false for a register holding it.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from .errors import CrdtValueError

__all__ = ["MAX_VALUE_DEPTH", "check_value", "value_key"]

MAX_VALUE_DEPTH = 32
_MIN_INT = -(1 << 63)
_MAX_INT = (1 << 64) - 1


def check_value(value: Any, _depth: int = 0) -> Any:
    """Return value normalised to msgpack's model (tuples -> lists), or raise CrdtValueError."""
    if _depth > MAX_VALUE_DEPTH:
        raise CrdtValueError(f"value nested deeper than {MAX_VALUE_DEPTH}")
    if value is None or type(value) in (bool, str, bytes):
        return value
    if type(value) is int:
        if not _MIN_INT <= value <= _MAX_INT:
            raise CrdtValueError("integer value outside the 64-bit range")
        return value
    if type(value) is float:
        if math.isnan(value):
            raise CrdtValueError("NaN is not a valid register value")
        return value
    if type(value) in (list, tuple):
        return [check_value(v, _depth + 1) for v in value]
    if type(value) is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise CrdtValueError(f"map keys in values must be str: {k!r}")
            out[k] = check_value(v, _depth + 1)
        return out
    raise CrdtValueError(f"unsupported value type {type(value).__name__}")


def value_key(value: Any) -> bytes:
    """Canonical bytes of a checked value, for deterministic tie-breaks.

    Dict keys are sorted first so {"a": 1, "b": 2} and {"b": 2, "a": 1} (equal in Python) get the
    same key.
    """
    return msgpack.packb(_sorted(value), use_bin_type=True)


def _sorted(value: Any) -> Any:
    if type(value) is dict:
        return {k: _sorted(value[k]) for k in sorted(value)}
    if type(value) is list:
        return [_sorted(v) for v in value]
    return value
