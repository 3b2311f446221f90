import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, func
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base


class UserLimits(Base):
    """An admin's overrides of one user's submit limits; a NULL column means the Settings default."""

    __tablename__ = "user_limits"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    requests_per_minute: Mapped[int | None]
    max_pending: Mapped[int | None]
    # Up to 10^12 tokens (LimitsIn): more than a 32-bit integer holds.
    token_budget: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_by: Mapped[uuid.UUID | None]
