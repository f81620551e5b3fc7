"""instances.rows and instances.columns: the image size, for study SRs after retention removed the source

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rows', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('columns', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('columns')
        batch_op.drop_column('rows')
