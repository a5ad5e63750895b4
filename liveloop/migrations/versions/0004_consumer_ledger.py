"""consumer ledger: offsets and consumed feedback kept in the database

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 14:50:00.000000
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('consumer_offsets',
    sa.Column('group_id', sa.String(length=200), nullable=False),
    sa.Column('topic', sa.String(length=249), nullable=False),
    sa.Column('partition', sa.Integer(), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('lost_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('group_id', 'topic', 'partition')
    )
    op.create_table('consumed_feedback',
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('completion_id', sa.String(length=64), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=20), nullable=False),
    sa.Column('version', sa.String(length=200), nullable=True),
    sa.Column('consumed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['version'], ['adapter_versions.name'], ),
    sa.PrimaryKeyConstraint('event_id')
    )
    with op.batch_alter_table('consumed_feedback', schema=None) as batch_op:
        batch_op.create_index('ix_consumed_feedback_completion', ['completion_id', 'revision'], unique=False)
    _backfill_from_lineage()


def _backfill_from_lineage() -> None:
    """Ratings already in a policy version's lineage count as consumed (orphans of the old trainer, rejected
    without a gate report, do not: their batch was to be trained again)."""
    bind = op.get_bind()
    versions = bind.execute(sa.text(
        "SELECT name, consumed_event_ids, created_at FROM adapter_versions WHERE kind = 'policy' "
        "AND NOT (state = 'rejected' AND (gate_report IS NULL OR CAST(gate_report AS TEXT) = 'null'))")).all()
    rows, seen = [], set()
    for name, event_ids, created_at in versions:
        event_ids = json.loads(event_ids) if isinstance(event_ids, str) else event_ids
        for event_id in event_ids or []:
            payload = bind.execute(sa.text("SELECT payload FROM outbox WHERE event_id = :e"), {"e": event_id}).scalar()
            if payload is None or event_id in seen:
                continue
            payload = json.loads(payload) if isinstance(payload, str) else payload
            seen.add(event_id)
            rows.append({"event_id": event_id, "completion_id": payload["completion_id"],
                         "revision": payload["revision"], "outcome": "trained", "version": name,
                         "consumed_at": created_at})
    if rows:
        table = sa.table('consumed_feedback', *(sa.column(c) for c in rows[0]))
        op.bulk_insert(table, rows)


def downgrade() -> None:
    with op.batch_alter_table('consumed_feedback', schema=None) as batch_op:
        batch_op.drop_index('ix_consumed_feedback_completion')
    op.drop_table('consumed_feedback')
    op.drop_table('consumer_offsets')
