"""The analysts' role reads what the SQL users run needs, and no longer the registry's internals.

0003 granted vtag_analyst SELECT on model_versions and evaluations too, beyond what the README
documents (labels, videos, video_labels, inference_runs, predictions and the production_labels view):
model_versions holds checkpoint locations and training configs, evaluations the registry's
bookkeeping. Every query in sql/queries runs without them; production_labels still resolves the
production model through model_versions, since a view reads its tables with its owner's rights.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ANALYST_ROLE = "vtag_analyst"
INTERNAL = ("model_versions", "evaluations")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"REVOKE ALL ON {', '.join(INTERNAL)} FROM {ANALYST_ROLE}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"GRANT SELECT ON {', '.join(INTERNAL)} TO {ANALYST_ROLE}")
