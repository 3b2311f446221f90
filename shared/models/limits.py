import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, func
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
    # Flow control: this user's weight in fair turns (default 1), and the most of a model's calls in flight
    # it may hold while other users wait (a fraction, NULL: no cap).
    fair_weight: Mapped[int | None]
    max_share: Mapped[float | None]
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_by: Mapped[uuid.UUID | None]


class FairTurn(Base):
    """Weighted fair queuing per model: a user's virtual time, advanced by 1/weight at each turn it takes.

    The fair claim serves the user with due work and the smallest virtual time (a newcomer starts at the
    smallest one among those waiting): a backlog of thousands delays another user by about one turn.
    """

    __tablename__ = "fair_turns"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    vtime: Mapped[float] = mapped_column(server_default="0")
