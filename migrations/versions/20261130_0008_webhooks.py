"""webhooks: endpoints and secrets, the deliveries outbox and the trigger that fills it

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql


revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One place for every way a query ends (worker outcome, API cancel, sweeper's worker_lost, anything later):
# the outbox row is written in the same transaction as the terminal write, so no crash can lose it.
OUTBOX_FUNCTION = """
CREATE FUNCTION aiq_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    target text := NEW.webhook_url;
    endpoint boolean := false;
BEGIN
    IF target IS NULL THEN
        SELECT url INTO target FROM webhook_endpoints
        WHERE user_id = NEW.user_id AND url IS NOT NULL AND disabled_at IS NULL;
        endpoint := target IS NOT NULL;
    END IF;
    IF target IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (query_id, user_id, url, to_endpoint, event_type, payload)
    VALUES (NEW.id, NEW.user_id, target, endpoint, 'query.' || NEW.status, jsonb_build_object(
        'type', 'query.' || NEW.status,
        'timestamp', to_char(coalesce(NEW.finished_at, now()) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'data', jsonb_build_object(
            'query_id', NEW.id,
            'status', NEW.status,
            'model', NEW.model,
            'attempts', NEW.attempts,
            'usage', CASE WHEN NEW.total_tokens IS NULL AND NEW.prompt_tokens IS NULL THEN NULL
                     ELSE jsonb_build_object('prompt_tokens', NEW.prompt_tokens,
                                             'completion_tokens', NEW.completion_tokens,
                                             'total_tokens', NEW.total_tokens) END,
            'error', CASE WHEN NEW.error_code IS NULL THEN NULL
                     ELSE jsonb_build_object('code', NEW.error_code) END
        )
    ));
    RETURN NULL;
END
$$
"""
OUTBOX_TRIGGER = """
CREATE TRIGGER queries_webhook_outbox AFTER UPDATE OF status ON queries FOR EACH ROW
WHEN (OLD.status IN ('pending', 'running') AND NEW.status IN ('completed', 'failed', 'cancelled'))
EXECUTE FUNCTION aiq_webhook_outbox()
"""


def upgrade() -> None:
    op.create_table('webhook_endpoints',
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('url', sa.Text(), nullable=True),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('disabled_reason', sa.String(length=64), nullable=True),
    sa.Column('secret', sa.String(length=100), nullable=False),
    sa.Column('previous_secret', sa.String(length=100), nullable=True),
    sa.Column('previous_secret_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_webhook_endpoints_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', name=op.f('pk_webhook_endpoints'))
    )
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.Uuid(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('query_id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('to_endpoint', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('event_type', sa.String(length=32), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_status_code', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name=op.f('ck_webhook_deliveries_status_valid')),
    sa.ForeignKeyConstraint(['query_id'], ['queries.id'], name=op.f('fk_webhook_deliveries_query_id_queries'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_webhook_deliveries_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries'))
    )
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['next_attempt_at'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index(op.f('ix_webhook_deliveries_query_id'), 'webhook_deliveries', ['query_id'], unique=False)
    op.add_column('queries', sa.Column('webhook_url', sa.Text(), nullable=True))
    op.execute(OUTBOX_FUNCTION)
    op.execute(OUTBOX_TRIGGER)


def downgrade() -> None:
    op.execute('DROP TRIGGER queries_webhook_outbox ON queries')
    op.execute('DROP FUNCTION aiq_webhook_outbox()')
    op.drop_column('queries', 'webhook_url')
    op.drop_index(op.f('ix_webhook_deliveries_query_id'), table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries', postgresql_where=sa.text("status = 'pending'"))
    op.drop_table('webhook_deliveries')
    op.drop_table('webhook_endpoints')
