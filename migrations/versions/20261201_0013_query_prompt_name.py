"""/v1 conversations: queries.prompt_name holds the final user message's participant `name`

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 00:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: PostgreSQL adds the column without rewriting the table.
    op.add_column('queries', sa.Column('prompt_name', sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column('queries', 'prompt_name')
