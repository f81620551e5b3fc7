"""results.model_version holds 64 characters, as a model card's version may

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 18:55:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.alter_column('model_version', existing_type=sa.String(length=32), type_=sa.String(length=64),
                              existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.alter_column('model_version', existing_type=sa.String(length=64), type_=sa.String(length=32),
                              existing_nullable=False)
