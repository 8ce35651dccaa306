"""initial schema

Revision ID: 0001
Revises: 
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_versions',
    sa.Column('model_version', sa.String(length=200), nullable=False),
    sa.Column('spec', sa.Text(), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('parent', sa.String(length=200), nullable=True),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model_version')
    )
    op.create_table('products',
    sa.Column('row_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('product_id', sa.String(length=256), nullable=False),
    sa.Column('title', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('category', sa.String(length=256), nullable=True),
    sa.Column('brand', sa.String(length=256), nullable=True),
    sa.Column('price', sa.Float(), nullable=True),
    sa.Column('currency', sa.String(length=8), nullable=True),
    sa.Column('image_ref', sa.Text(), nullable=True),
    sa.Column('image_uri', sa.Text(), nullable=True),
    sa.Column('image_hash', sa.String(length=64), nullable=True),
    sa.Column('text_hash', sa.String(length=64), nullable=True),
    sa.Column('image_status', sa.String(length=32), nullable=False),
    sa.Column('image_error', sa.Text(), nullable=True),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('row_id'),
    sa.UniqueConstraint('product_id')
    )
    with op.batch_alter_table('products', schema=None) as batch_op:
        batch_op.create_index('ix_products_brand', ['brand'], unique=False)
        batch_op.create_index('ix_products_category', ['category'], unique=False)
        batch_op.create_index('ix_products_deleted_at', ['deleted_at'], unique=False)
        batch_op.create_index('ix_products_price', ['price'], unique=False)

    op.create_table('search_log',
    sa.Column('query_id', sa.String(length=64), nullable=False),
    sa.Column('query_text', sa.Text(), nullable=True),
    sa.Column('image_hash', sa.String(length=64), nullable=True),
    sa.Column('target', sa.String(length=16), nullable=False),
    sa.Column('filters', sa.JSON(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('offset', sa.Integer(), nullable=False),
    sa.Column('model_version', sa.String(length=200), nullable=False),
    sa.Column('index_version', sa.String(length=200), nullable=False),
    sa.Column('result_ids', sa.JSON(), nullable=False),
    sa.Column('took_ms', sa.Float(), nullable=False),
    sa.Column('ts', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('query_id')
    )
    with op.batch_alter_table('search_log', schema=None) as batch_op:
        batch_op.create_index('ix_search_log_ts', ['ts'], unique=False)

    op.create_table('training_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('serving_model_version', sa.String(length=200), nullable=True),
    sa.Column('candidate_model_version', sa.String(length=200), nullable=True),
    sa.Column('data_window', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('decision', sa.String(length=32), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=True),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('query_id', sa.String(length=64), nullable=False),
    sa.Column('product_id', sa.String(length=256), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('ts', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['query_id'], ['search_log.query_id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('event_id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_query_id', ['query_id'], unique=False)
        batch_op.create_index('ix_events_ts', ['ts'], unique=False)

    op.create_table('index_versions',
    sa.Column('index_version', sa.String(length=200), nullable=False),
    sa.Column('model_version', sa.String(length=200), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('manifest', sa.JSON(), nullable=False),
    sa.Column('is_active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('activated_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['model_version'], ['model_versions.model_version'], ),
    sa.PrimaryKeyConstraint('index_version')
    )


def downgrade() -> None:
    op.drop_table('index_versions')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_ts')
        batch_op.drop_index('ix_events_query_id')

    op.drop_table('events')
    op.drop_table('training_runs')
    with op.batch_alter_table('search_log', schema=None) as batch_op:
        batch_op.drop_index('ix_search_log_ts')

    op.drop_table('search_log')
    with op.batch_alter_table('products', schema=None) as batch_op:
        batch_op.drop_index('ix_products_price')
        batch_op.drop_index('ix_products_deleted_at')
        batch_op.drop_index('ix_products_category')
        batch_op.drop_index('ix_products_brand')

    op.drop_table('products')
    op.drop_table('model_versions')
