"""Validation of names people choose (users, rooms). Pure."""

from __future__ import annotations

import unicodedata

from ..errors import BadRequest

MAX_NAME = 64
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
# Bidirectional overrides and isolates can make a name render as a different one.
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def validate_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    if unicodedata.normalize("NFC", value) != value:
        raise BadRequest(f"{what} must be in Unicode NFC form")
    if not 1 <= len(value) <= MAX_NAME:
        raise BadRequest(f"{what} must be 1-{MAX_NAME} characters")
    if value != value.strip():
        raise BadRequest(f"{what} must not start or end with white space")
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") or ch in _BIDI:
            raise BadRequest(f"{what} must not contain control, format or bidi characters")
    if "/" in value:
        raise BadRequest(f"{what} must not contain '/'")
    return value


def validate_password(value: object) -> str:
    if not isinstance(value, str) or not MIN_PASSWORD <= len(value) <= MAX_PASSWORD:
        raise BadRequest(f"password must be {MIN_PASSWORD}-{MAX_PASSWORD} characters")
    if not is_unicode_text(value):
        raise BadRequest("password is not valid Unicode text (it holds a lone surrogate)")
    return value


def is_unicode_text(value: str) -> bool:
    """JSON can carry lone surrogates ("\\ud800") that no UTF-8 encoder accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
