"""The names a client may send (models, studies) and DICOM UIDs: one allow-list for every door and check."""

from __future__ import annotations

import re

# Letters, digits, '.', '_', '-'; starts with a letter or digit; at most 128 characters; no '..' (is_safe_name).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_CHARS = 64


def is_safe_name(value) -> bool:
    """Whether ``value`` is a name that cannot reach outside its folder (no separator, no '..', no root)."""
    return isinstance(value, str) and bool(SAFE_NAME.fullmatch(value)) and ".." not in value


def is_dicom_uid(value) -> bool:
    """Whether ``value`` is a DICOM UID (digits and dots, at most 64 characters)."""
    return isinstance(value, str) and len(value) <= MAX_UID_CHARS and bool(DICOM_UID.fullmatch(value))
