"""adapter registry

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 03:43:50.166934
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('adapter_heads',
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('kind')
    )
    # the lock rows every transition takes; the kinds are fixed, so they exist from the start
    op.bulk_insert(sa.table("adapter_heads", sa.column("kind", sa.String), sa.column("revision", sa.Integer)),
                   [{"kind": "policy", "revision": 0}, {"kind": "reward", "revision": 0}])
    op.create_table('adapter_versions',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('uri', sa.String(length=1000), nullable=False),
    sa.Column('base_model_id', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('state_changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('parent', sa.String(length=200), nullable=True),
    sa.Column('reward_source', sa.String(length=200), nullable=True),
    sa.Column('consumed_event_ids', sa.JSON(), nullable=False),
    sa.Column('kafka_offsets', sa.JSON(), nullable=False),
    sa.Column('training_metrics', sa.JSON(), nullable=False),
    sa.Column('gate_report', sa.JSON(), nullable=True),
    sa.Column('predecessor', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['kind'], ['adapter_heads.kind'], ),
    sa.ForeignKeyConstraint(['parent'], ['adapter_versions.name'], ),
    sa.ForeignKeyConstraint(['predecessor'], ['adapter_versions.name'], ),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('adapter_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_versions_state'), ['state'], unique=False)
        for state in ("canary", "promoted"):  # at most one live and one canary version per kind
            where = sa.text(f"state = '{state}'")
            batch_op.create_index(f"uq_adapter_versions_one_{state}", ["kind"], unique=True,
                                  sqlite_where=where, postgresql_where=where)

    op.create_table('adapter_transitions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('version', sa.String(length=200), nullable=False),
    sa.Column('from_state', sa.String(length=20), nullable=True),
    sa.Column('to_state', sa.String(length=20), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['version'], ['adapter_versions.name'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('adapter_transitions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_transitions_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapter_transitions_version'), ['version'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('adapter_transitions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_transitions_version'))
        batch_op.drop_index(batch_op.f('ix_adapter_transitions_at'))

    op.drop_table('adapter_transitions')
    with op.batch_alter_table('adapter_versions', schema=None) as batch_op:
        batch_op.drop_index("uq_adapter_versions_one_promoted")
        batch_op.drop_index("uq_adapter_versions_one_canary")
        batch_op.drop_index(batch_op.f('ix_adapter_versions_state'))

    op.drop_table('adapter_versions')
    op.drop_table('adapter_heads')
