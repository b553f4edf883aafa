"""owners, projects and tags of experiments (indexed for search), the audit log, each run's GPUs
and why it waits (quotas), its attempt and the kind of its last failure (retries), what it claims from the cluster

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 00:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(64), nullable=False, server_default="anonymous"))
        batch_op.add_column(sa.Column("project", sa.String(64), nullable=False, server_default="default"))
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpus", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("waiting", sa.String(200), nullable=True))
        batch_op.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("failure_kind", sa.String(16), nullable=True))
        batch_op.add_column(sa.Column("demand", sa.JSON(), nullable=True))
    op.create_index("ix_runs_dispatched_at", "runs", ["dispatched_at"])  # the fair order's recent dispatches
    op.create_index("ix_experiments_created", "experiments", ["created_at", "id"])
    op.create_index("ix_experiments_project_created", "experiments", ["project", "created_at", "id"])
    op.create_index("ix_experiments_owner_created", "experiments", ["owner", "created_at", "id"])
    op.create_table(
        "experiment_tags",
        sa.Column("experiment_id", sa.String(32), sa.ForeignKey("experiments.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("value", sa.String(512), nullable=False),
    )
    op.create_index("ix_experiment_tags_key_value", "experiment_tags", ["key", "value", "experiment_id"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_audit_at", "audit", ["at", "id"])


def downgrade() -> None:
    op.drop_index("ix_audit_at", table_name="audit")
    op.drop_table("audit")
    op.drop_index("ix_experiment_tags_key_value", table_name="experiment_tags")
    op.drop_table("experiment_tags")
    op.drop_index("ix_experiments_owner_created", table_name="experiments")
    op.drop_index("ix_experiments_project_created", table_name="experiments")
    op.drop_index("ix_experiments_created", table_name="experiments")
    op.drop_index("ix_runs_dispatched_at", table_name="runs")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("demand")
        batch_op.drop_column("failure_kind")
        batch_op.drop_column("attempt")
        batch_op.drop_column("waiting")
        batch_op.drop_column("gpus")
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.drop_column("project")
        batch_op.drop_column("owner")
