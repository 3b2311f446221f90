"""flow control: query priority, fair-claim index, fair weight and share cap per user

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('queries', sa.Column('priority', sa.Text(), server_default='interactive', nullable=False))
    op.create_check_constraint('priority_valid', 'queries', "priority IN ('interactive', 'batch')")
    op.create_index(
        'ix_queries_fair', 'queries', ['model', 'user_id', 'next_attempt_at'], unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.add_column('user_limits', sa.Column('fair_weight', sa.Integer(), nullable=True))
    op.add_column('user_limits', sa.Column('max_share', sa.Float(), nullable=True))
    op.create_table(
        'fair_turns',
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('user_id', sa.Uuid(), nullable=False),
        sa.Column('vtime', sa.Float(), server_default='0', nullable=False),
        sa.ForeignKeyConstraint(
            ['user_id'], ['users.id'], name=op.f('fk_fair_turns_user_id_users'), ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('model', 'user_id', name=op.f('pk_fair_turns')),
    )


def downgrade() -> None:
    op.drop_table('fair_turns')
    op.drop_column('user_limits', 'max_share')
    op.drop_column('user_limits', 'fair_weight')
    op.drop_index('ix_queries_fair', table_name='queries', postgresql_where=sa.text("status = 'pending'"))
    op.drop_constraint('priority_valid', 'queries', type_='check')
    op.drop_column('queries', 'priority')
