"""webhooks: a response-cache hit, stored already completed, writes its outbox row too

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 01:00:00
"""

from collections.abc import Sequence

from alembic import op


revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The 0008 trigger watches status UPDATEs only; a cache hit is INSERTed completed. Same function, so the
# payload and the endpoint fallback stay in one place. Only hits: a bulk load of finished rows (a test
# fixture, a data import) neither pays a plpgsql call per row nor sends webhooks for old queries.
INSERT_TRIGGER = """
CREATE TRIGGER queries_webhook_outbox_insert AFTER INSERT ON queries FOR EACH ROW
WHEN (NEW.cached AND NEW.status IN ('completed', 'failed', 'cancelled'))
EXECUTE FUNCTION aiq_webhook_outbox()
"""


def upgrade() -> None:
    op.execute(INSERT_TRIGGER)


def downgrade() -> None:
    op.execute('DROP TRIGGER queries_webhook_outbox_insert ON queries')
