"""/v1 gaps: a response's `background` is kept; files expire (batch output files as the batch asks)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: PostgreSQL adds the column without rewriting the table.
    op.add_column('queries', sa.Column('background', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.add_column('files', sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('batches', sa.Column('output_expires_seconds', sa.Integer(), nullable=True))
    op.create_index(
        'ix_files_expires_at', 'files', ['expires_at'], unique=False,
        postgresql_where=sa.text('expires_at IS NOT NULL'),
    )


def downgrade() -> None:
    op.drop_index('ix_files_expires_at', table_name='files', postgresql_where=sa.text('expires_at IS NOT NULL'))
    op.drop_column('batches', 'output_expires_seconds')
    op.drop_column('files', 'expires_at')
    op.drop_column('queries', 'background')
