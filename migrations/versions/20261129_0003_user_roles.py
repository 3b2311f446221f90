"""user roles and disabled accounts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 21:35:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('users', sa.Column('role', sa.String(length=16), server_default='user', nullable=False))
    op.add_column('users', sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint(op.f('ck_users_role_known'), 'users', "role IN ('user', 'admin')")


def downgrade() -> None:
    op.drop_constraint(op.f('ck_users_role_known'), 'users', type_='check')
    op.drop_column('users', 'disabled_at')
    op.drop_column('users', 'role')
