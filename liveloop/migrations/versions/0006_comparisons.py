"""choices of one request, and comparisons of them

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 20:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('choice_index', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_completions_request_id'), ['request_id'], unique=False)

    op.create_table('comparisons',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('ranking', sa.JSON(), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('client_feedback_id', sa.String(length=200), nullable=True),
    sa.Column('supersedes_id', sa.String(length=64), nullable=True),
    sa.Column('user_id', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['supersedes_id'], ['comparisons.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('client_feedback_id'),
    sa.UniqueConstraint('request_id', 'revision', name='uq_comparisons_request_revision')
    )
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_comparisons_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_comparisons_request_id'), ['request_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_comparisons_request_id'))
        batch_op.drop_index(batch_op.f('ix_comparisons_created_at'))

    op.drop_table('comparisons')
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_completions_request_id'))
        batch_op.drop_column('choice_index')
        batch_op.drop_column('request_id')
