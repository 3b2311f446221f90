"""Password policy after NIST SP 800-63B §5.1.1.2: a minimum length, a blocklist, no composition rules."""

from __future__ import annotations

import gzip
from functools import cache
from importlib import resources

from shared.errors import InvalidInput
from shared.security import BCRYPT_MAX_BYTES, password_fits

# Django's list of 20,000 common passwords (Royce Williams' compilation), BSD licence: shared/data/README.md.
_BLOCKLIST_FILE = "common-passwords.txt.gz"


@cache
def common_passwords() -> frozenset[str]:
    """The blocklist, lower-cased; read once per process (about 20k entries, ~1.5 MB in memory)."""
    data = resources.files("shared").joinpath("data", _BLOCKLIST_FILE).read_bytes()
    return frozenset(line.strip().lower() for line in gzip.decompress(data).decode("utf-8").splitlines() if line)


def _refuse(code: str, message: str, field: str) -> InvalidInput:
    return InvalidInput(message, code=code, details=[{"loc": ["body", field], "msg": message, "type": code}])


def check_password(password: str, email: str, min_length: int, field: str = "password") -> None:
    """Raise a 422 naming the rule the password breaks (at body field `field`); the password is never echoed."""
    if len(password) < min_length:
        raise _refuse("password_too_short", f"Password must be at least {min_length} characters", field)
    if not password_fits(password):
        raise _refuse("password_too_long", f"Password must be at most {BCRYPT_MAX_BYTES} bytes in UTF-8", field)
    lowered = password.lower()
    if lowered in common_passwords():
        message = "This password is on a list of commonly used passwords; choose another"
        raise _refuse("password_too_common", message, field)
    local_part = email.strip().lower().partition("@")[0]
    if lowered in (email.strip().lower(), local_part):
        raise _refuse("password_matches_email", "Password must not be your email address", field)
