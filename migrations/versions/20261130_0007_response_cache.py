"""response cache: queries.cached, and the usage index carries it

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-30 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_USAGE_COLUMNS = ['model', 'prompt_tokens', 'completion_tokens', 'total_tokens', 'reserved_tokens']


def upgrade() -> None:
    # A constant default: PostgreSQL adds the column without rewriting the table.
    op.add_column('queries', sa.Column('cached', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    # Usage reports stay index-only scans: `cached_tokens` needs the flag in the index too.
    op.drop_index('ix_queries_user_usage', table_name='queries', postgresql_include=_USAGE_COLUMNS)
    op.create_index(
        'ix_queries_user_usage', 'queries', ['user_id', 'created_at'], unique=False,
        postgresql_include=[*_USAGE_COLUMNS, 'cached'],
    )


def downgrade() -> None:
    op.drop_index('ix_queries_user_usage', table_name='queries', postgresql_include=[*_USAGE_COLUMNS, 'cached'])
    op.create_index(
        'ix_queries_user_usage', 'queries', ['user_id', 'created_at'], unique=False, postgresql_include=_USAGE_COLUMNS
    )
    op.drop_column('queries', 'cached')
