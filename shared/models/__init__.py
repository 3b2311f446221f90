"""Every model, re-exported: API, worker and migrations import from here."""

from shared.models.base import Base
from shared.models.limits import UserLimits
from shared.models.query import TERMINAL_STATUSES, IdempotencyKey, Query, QueryStatus
from shared.models.user import RefreshToken, Role, User

__all__ = [
    "TERMINAL_STATUSES",
    "Base",
    "IdempotencyKey",
    "Query",
    "QueryStatus",
    "RefreshToken",
    "Role",
    "User",
    "UserLimits",
]
