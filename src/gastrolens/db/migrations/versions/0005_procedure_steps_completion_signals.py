"""procedure_steps (MPPS) and completion_signals (MPPS final state or `studies complete`, for the completion job)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 01:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('procedure_steps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('status', sa.Enum('IN PROGRESS', 'COMPLETED', 'DISCONTINUED', name='procedurestepstatus', native_enum=False, length=32), nullable=False),
    sa.Column('step_id', sa.String(length=16), nullable=True),
    sa.Column('station_ae', sa.String(length=16), nullable=True),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.Column('peer_address', sa.String(length=64), nullable=True),
    sa.Column('referenced', sa.JSON(), nullable=False),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_procedure_steps')),
    sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_procedure_steps_sop_instance_uid'))
    )
    with op.batch_alter_table('procedure_steps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_procedure_steps_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('completion_signals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.Enum('mpps-completed', 'mpps-discontinued', 'command', name='completionsignalkind', native_enum=False, length=32), nullable=False),
    sa.Column('procedure_step_id', sa.Integer(), nullable=True),
    sa.Column('actor', sa.String(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('handled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['procedure_step_id'], ['procedure_steps.id'], name=op.f('fk_completion_signals_procedure_step_id_procedure_steps')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_completion_signals'))
    )
    with op.batch_alter_table('completion_signals', schema=None) as batch_op:
        batch_op.create_index('ix_completion_signals_pending', ['handled_at', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_completion_signals_study_instance_uid'), ['study_instance_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('completion_signals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_completion_signals_study_instance_uid'))
        batch_op.drop_index('ix_completion_signals_pending')
    op.drop_table('completion_signals')
    with op.batch_alter_table('procedure_steps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_procedure_steps_study_instance_uid'))
    op.drop_table('procedure_steps')
